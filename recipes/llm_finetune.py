"""Fine-tune a pretrained causal LM from a Hugging Face directory to write docstrings.

    hf download meta-llama/Llama-3.2-1B --local-dir models/llama-3.2-1b --exclude "original/*"
    accelerate launch -m launcher recipes/llm_finetune --model_dir=models/llama-3.2-1b --mixed_precision=bf16
    accelerate launch -m launcher recipes/llm_finetune --model_dir=... --lora_rank=16 --data_parallel=fsdp

`--model_dir` names the directory as `save_pretrained` or `hf download` (huggingface-cli) writes
it: config.json, the weights (safetensors, sharded or not) and the tokenizer. The model is built
from its config and loaded with launcher.load_weights from `--weights`, by default the directory's
own (`evaluate` and `predict` build it from the config alone, then load the run's checkpoint).
With `--lora_rank` > 0 peft wraps it and only the adapters train. The decoder layers are the FSDP
shard units. At the end the run writes the fine-tuned model as `save_pretrained` does, with the
tokenizer files, to OUTPUT_DIR/hf/ (with LoRA: the adapters to OUTPUT_DIR/adapter/, and the merged
model to OUTPUT_DIR/hf/ with --export_merged).

Data: supervised fine-tuning on text that ships with Python. Every documented function of the
`modules` (standard library, read with `ast` from the source files, never imported) gives one
example: the prompt is its qualified name and signature, opening a docstring,

    # json.decoder.JSONDecoder.decode
    def decode(self, s, _w=WHITESPACE.match):
        \"\"\"

and the completion is the docstring's first paragraph (its summary), the closing quotes and the
end-of-text token. The loss counts the completion's tokens only (labels -100 on the prompt and
the padding), summed and divided by the completion tokens of the whole optimizer step (every
micro-batch, every rank), as recipes/char_lm does. Examples are split by a hash of their name
(`val_percent` to validation), so the split does not depend on the order or the other modules; the
text pairs are cached as JSON in `data_dir`, tokenised at start-up with the model's tokenizer.

Padding, not packing: each batch is padded on the right to its longest example. Docstring
examples are short (tens to a couple of hundred tokens), so little is padding, and every example
attends only to itself. Packing several into one row would need a block-diagonal attention mask
to keep them apart, which the fast attention kernels take only as variable-length batches
(flash-attention), not on every device. With right padding the causal mask already keeps the
padding out of every real token's view, so no attention mask is passed, and SDPA keeps its
causal fast path.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from launcher import ConfigError, DataSpec, Group, Schedule, StepOutput, TrainConfig, load_weights
from recipes.stdlib_text import DOCUMENTED_MODULES

IGNORE = -100  # label of the prompt and the padding: F.cross_entropy's ignore_index
PRETRAINED = "pretrained"  # --weights: the weights in --model_dir


@dataclass
class Config(TrainConfig):
    #: the pretrained model: a Hugging Face directory (config.json, tokenizer files, weights)
    model_dir: str = ""
    #: initial weights: "pretrained" (model_dir's), a launcher run, a Hugging Face directory or file;
    #: "": random
    weights: str = PRETRAINED
    data_dir: str = "data/docstrings"  # where the extracted (prompt, completion) pairs are cached as JSON
    #: standard-library modules whose documented functions are the examples (recipes/stdlib_text.py)
    modules: tuple[str, ...] = DOCUMENTED_MODULES
    val_percent: int = 10  # percent of the examples held out for validation (by a hash of their name)
    block_size: int = 256  # tokens per example at most (prompt + completion; longer completions are cut)
    lora_rank: int = 0  # LoRA rank of the adapters (0: full fine-tune, every weight trains)
    lora_alpha: float = 32.0  # LoRA scale numerator: the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05  # dropout on the adapters' input (0: off)
    #: module names that get adapters; all-linear: every linear layer but the output head
    lora_targets: tuple[str, ...] = ("all-linear",)
    output_dir: str = "runs/llm_finetune"
    epochs: int = 2
    batch_size: int = 8
    lr: float = 2e-5  # full fine-tune; with LoRA try 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    num_workers: int = 0  # the examples are tensors in memory: nothing to decode in workers


# ---- data ---------------------------------------------------------------------------------------


def module_source(name: str) -> str:
    """The source of a standard-library module, read from its file (frozen modules such as os too)."""
    root = os.path.join(sysconfig.get_paths()["stdlib"], *name.split("."))
    for path in (root + ".py", os.path.join(root, "__init__.py")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    raise ConfigError(
        f"--modules names {name}, which has no source file in {sysconfig.get_paths()['stdlib']}; "
        "name standard-library modules written in Python"
    )


def module_examples(module: str) -> list[dict]:
    """{"name", "prompt", "completion"} for each function or method of `module` with a docstring."""
    examples = []

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{scope}.{child.name}"
                doc = ast.get_docstring(child)
                if doc and not isinstance(child, ast.ClassDef):
                    summary = doc.split("\n\n")[0].strip()
                    returns = f" -> {ast.unparse(child.returns)}" if child.returns else ""
                    keyword = "async def" if isinstance(child, ast.AsyncFunctionDef) else "def"
                    prompt = f'# {name}\n{keyword} {child.name}({ast.unparse(child.args)}){returns}:\n    """'
                    examples.append(
                        {
                            "name": name,
                            "prompt": prompt,
                            "completion": summary.replace("\n", "\n    ") + '"""',
                        }
                    )
                visit(child, name)

    visit(ast.parse(module_source(module)), module)
    return examples


def docstring_pairs(modules: tuple[str, ...], val_percent: int) -> dict[str, list[dict]]:
    """The train and val examples of `modules`: duplicates dropped, split by a hash of the name."""
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    seen = set()
    for module in modules:
        for example in module_examples(module):
            if (example["prompt"], example["completion"]) in seen:
                continue
            seen.add((example["prompt"], example["completion"]))
            held_out = zlib.crc32(example["name"].encode()) % 100 < val_percent
            splits["val" if held_out else "train"].append(example)
    return splits


def cached_pairs(cfg: Config) -> dict[str, list[dict]]:
    """docstring_pairs, read from (or first written to) data_dir: one file per modules, split and Python."""
    key = json.dumps([list(cfg.modules), cfg.val_percent, sys.version_info[:2]])
    path = os.path.join(cfg.data_dir, f"docstrings-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    pairs = docstring_pairs(cfg.modules, cfg.val_percent)
    os.makedirs(cfg.data_dir, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"  # every rank may write it at once: whole files only, by rename
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(pairs, f, indent=0)
    os.replace(temporary, path)
    return pairs


def tokenize(example: dict, tokenizer, block_size: int) -> dict | None:
    """{"tokens": prompt + completion + end-of-text ids, cut to block_size + 1, "prompt_tokens": the
    prompt's count}; None when the prompt leaves no room for a completion token."""
    prompt = tokenizer(example["prompt"])["input_ids"]  # with the tokenizer's own start token, if any
    completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    if len(prompt) >= block_size:
        return None
    return {"tokens": torch.tensor((prompt + completion)[: block_size + 1]), "prompt_tokens": len(prompt)}


def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Samples -> {"input_ids": (N, T), "labels": (N, T)}: labels[i] is the token after input_ids[i],
    -100 where that token is the prompt's or padding. Padded on the right to the longest."""
    labels = []
    for sample in samples:
        label = sample["tokens"].clone()
        label[: sample["prompt_tokens"]] = IGNORE
        labels.append(label)
    tokens = pad_sequence([s["tokens"] for s in samples], batch_first=True, padding_value=pad_id)
    labels = pad_sequence(labels, batch_first=True, padding_value=IGNORE)
    return {"input_ids": tokens[:, :-1], "labels": labels[:, 1:]}


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    directory = cfg.model_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"no tokenizer in {directory} ({str(error).splitlines()[0]}); --model_dir must hold "
            "the model's tokenizer files (tokenizer.json, tokenizer_config.json)"
        ) from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"the tokenizer in {directory} has no end-of-text token (eos_token); the completions end with it"
        )
    return tokenizer


def build_data(cfg: Config) -> DataSpec:
    _check_model_dir(cfg)
    if cfg.block_size < 2:
        raise ConfigError(f"--block_size must be >= 2, got {cfg.block_size}")
    if not 0 < cfg.val_percent < 100:
        raise ConfigError(f"--val_percent must be in 1..99, got {cfg.val_percent}")
    tokenizer = load_tokenizer(cfg)
    splits = {
        name: [s for s in (tokenize(e, tokenizer, cfg.block_size) for e in pairs) if s is not None]
        for name, pairs in cached_pairs(cfg).items()
    }
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return DataSpec(
        train=splits["train"], val=splits["val"], collate=functools.partial(collate, pad_id=pad_id)
    )


# ---- model --------------------------------------------------------------------------------------


def _check_model_dir(cfg: Config) -> None:
    if not cfg.model_dir or not os.path.isfile(os.path.join(cfg.model_dir, "config.json")):
        raise ConfigError(
            f"--model_dir must name a Hugging Face model directory with config.json, got {cfg.model_dir!r}; "
            "download one (hf download NAME --local-dir DIR) or write a small one "
            "with scripts/make_tiny_llama.py"
        )


def build_model(cfg: Config) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    _check_model_dir(cfg)
    if cfg.lora_rank < 0:
        raise ConfigError(f"--lora_rank must be >= 0 (0: full fine-tune), got {cfg.lora_rank}")
    # fp32: the master weights
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model_dir))
    if cfg.weights:
        load_weights(model, cfg.model_dir if cfg.weights == PRETRAINED else cfg.weights)
    if cfg.lora_rank:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_targets[0] if cfg.lora_targets == ("all-linear",) else list(cfg.lora_targets)
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                target_modules=targets,
                lora_dropout=cfg.lora_dropout,
                task_type="CAUSAL_LM",
            ),
        )
    return model


def build_schedule(cfg: Config, model: nn.Module) -> Schedule:
    """Every weight trains, norms without weight decay; with LoRA the same group holds the adapters
    alone (peft's frozen base joins no group)."""
    return Schedule(groups=[Group("all")], no_decay_norm_bias=True)


def tokenizer_dir(cfg: Config) -> str:
    """Its tokenizer files are copied beside the exported model (OUTPUT_DIR/hf/)."""
    return cfg.model_dir


def shard_units(cfg: Config, model: nn.Module) -> list[nn.Module]:
    """The decoder layers: the modules the transformers model says never to split (_no_split_modules)."""
    pretrained = next(m for m in model.modules() if getattr(type(m), "_no_split_modules", None))
    names = set(pretrained._no_split_modules)
    return [m for m in model.modules() if type(m).__name__ in names]


def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    logits = model(input_ids=batch["input_ids"]).logits
    labels = batch["labels"]
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return StepOutput(loss=loss_sum, count=(labels != IGNORE).sum())
