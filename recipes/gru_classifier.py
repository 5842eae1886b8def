"""A GRU that reads one line of Python source and names the standard-library module it comes from.

    python -m launcher recipes/gru_classifier
    python -m launcher predict recipes/gru_classifier --checkpoint=runs/gru_classifier \\
        "parser.add_argument('--foo')"

The data is the source of the `source_modules` as installed with Python (no network, nothing
written to disk): every line with at least `min_chars` non-space characters, stripped, as UTF-8
bytes (token = byte + 1; 0 pads), cut to `max_len` tokens. A line found in two modules is
dropped; each module gives the same number of lines (at most `lines_per_class`), and a seeded
split holds `val_fraction` of each module's lines out. Lines have different lengths: `collate`
pads each batch to its longest line and the GRU skips the padding (packed sequences).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

from launcher import ConfigError, DataSpec, TrainConfig

VOCAB = 257  # 256 byte values + 1; token 0 is padding
# in CPython 3.10 to 3.13
MODULES = ("argparse", "typing", "tarfile", "logging", "http.client", "email.message")


@dataclass
class Config(TrainConfig):
    source_modules: tuple[str, ...] = MODULES  # standard-library modules, one class each
    min_chars: int = 20  # keep source lines with at least this many non-space characters
    max_len: int = 96  # tokens (bytes) kept from the start of each line
    lines_per_class: int = 600  # lines taken from each module (fewer if its smallest module has fewer)
    val_fraction: float = 0.2  # share of each module's lines held out for validation
    split_seed: int = 0  # seed of the line sampling and train/val split (apart from --seed)
    embed_dim: int = 64  # byte embedding size
    hidden: int = 128  # GRU hidden units
    num_layers: int = 1  # stacked GRU layers
    output_dir: str = "runs/gru_classifier"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0


class GRUClassifier(nn.Module):
    def __init__(self, num_classes: int, embed_dim: int, hidden: int, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, embed_dim, padding_idx=0)
        self.gru = nn.GRU(embed_dim, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # pack_padded_sequence wants the lengths on the CPU, wherever the tokens are.
        packed = pack_padded_sequence(
            self.embed(tokens), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        _, last = self.gru(packed)  # (num_layers, N, hidden): each line's state after its last real token
        return self.head(last[-1])


def encode(line: str, max_len: int) -> torch.Tensor:
    return torch.tensor(list(line.encode("utf-8")[:max_len]), dtype=torch.long) + 1


def source_lines(module_name: str, min_chars: int) -> list[str]:
    """The module's distinct stripped lines with at least min_chars non-space characters, in file order."""
    try:
        source = inspect.getsource(importlib.import_module(module_name))
    except (ImportError, OSError, TypeError) as error:
        raise ConfigError(f"--source_modules: cannot read the source of {module_name!r} ({error})") from None
    lines = (line.strip() for line in source.splitlines())
    return list(dict.fromkeys(line for line in lines if len("".join(line.split())) >= min_chars))


@functools.lru_cache(maxsize=4)
def module_lines(
    modules: tuple[str, ...], min_chars: int, lines_per_class: int, val_fraction: float, split_seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, val) lists of (line, class index): balanced classes, seeded, the same every run."""
    if len(modules) < 2:
        raise ConfigError(f"--source_modules needs at least 2 modules, got {len(modules)}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    per_module = [source_lines(name, min_chars) for name in modules]
    seen_in: dict[str, int] = {}
    for lines in per_module:
        for line in lines:
            seen_in[line] = seen_in.get(line, 0) + 1
    # no line in two classes
    per_module = [[line for line in lines if seen_in[line] == 1] for lines in per_module]
    count = min(lines_per_class, *(len(lines) for lines in per_module))
    rng = random.Random(split_seed)
    cut = int(round(count * val_fraction))
    train, val = [], []
    for label, lines in enumerate(per_module):
        chosen = rng.sample(lines, count)
        val += [(line, label) for line in chosen[:cut]]
        train += [(line, label) for line in chosen[cut:]]
    return train, val


class LineDataset(torch.utils.data.Dataset):
    """Samples ((tokens (L,) long, length), label)."""

    def __init__(self, items: list[tuple[str, int]], max_len: int):
        self.items, self.max_len = items, max_len

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        line, label = self.items[index]
        tokens = encode(line, self.max_len)
        return (tokens, len(tokens)), label


def collate(samples: list) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Pad to the batch's longest line: ((tokens (N, Lmax), lengths (N,)), labels (N,))."""
    tokens = pad_sequence([tokens for (tokens, _), _ in samples], batch_first=True, padding_value=0)
    lengths = torch.tensor([length for (_, length), _ in samples], dtype=torch.long)
    labels = torch.tensor([label for _, label in samples], dtype=torch.long)
    return (tokens, lengths), labels


def build_model(cfg: Config) -> nn.Module:
    return GRUClassifier(len(cfg.source_modules), cfg.embed_dim, cfg.hidden, cfg.num_layers)


def build_data(cfg: Config) -> DataSpec:
    if cfg.max_len < 1:
        raise ConfigError(f"--max_len must be >= 1, got {cfg.max_len}")
    train, val = module_lines(
        tuple(cfg.source_modules), cfg.min_chars, cfg.lines_per_class, cfg.val_fraction, cfg.split_seed
    )
    return DataSpec(
        train=LineDataset(train, cfg.max_len),
        val=LineDataset(val, cfg.max_len),
        classes=list(cfg.source_modules),
        collate=collate,
    )


def predict_sample(cfg: Config, text: str):
    """A line of Python -> (tokens, length), encoded as the training lines are (the launcher adds a
    placeholder label)."""
    tokens = encode(text.strip(), cfg.max_len)
    if len(tokens) == 0:
        raise ConfigError("expected a line of Python source, got an empty string")
    return tokens, len(tokens)
