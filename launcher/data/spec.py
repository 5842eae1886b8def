"""What a split of a recipe's data is: WebDataset tar shards (`Shards`, decoded per sample by
launcher.data.decoders), random batches with a real batch's structure (`Synthetic`), or any
map-style torch Dataset; and the recipe's `DataSpec` of its splits."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch.utils.data import Dataset

from launcher.config import ConfigError
from launcher.data.batch import Batch, Collate
from launcher.data.decoders import IMAGE_EXTENSIONS, fields, image_label


@dataclass
class Shards:
    """A split stored as WebDataset tar shards. By default each sample is an image and its `cls`
    label, `(transform(image), label)`; `decode` reads any other sample (launcher.data.decoders)."""

    # paths, s3:// gs:// http(s):// URLs, `pipe:` commands (brace patterns in any), or a directory with
    # index.json
    urls: str | Sequence[str]
    # per sample in the workers: the image (default decode; uint8 keeps batches small), or the decoded sample;
    # one with from_bytes (launcher.presets) gets the image undecoded
    transform: Callable | None = None
    # on the device, per batch (e.g. uint8 -> normalized float): a pair's inputs, else the batch
    batch_transform: Callable | None = None
    shuffle_buffer: int = 1000  # samples held for shuffling (training only); 0: read in order
    image_keys: Sequence[str] = IMAGE_EXTENSIONS  # default decode: the first present one is the image
    index: str = ""  # index.json (path or URL); "": the one beside the shards (remote shards need one)
    # raw sample (extension -> bytes) -> sample; None: image and cls
    decode: Callable[[dict], Any] | None = None

    def __post_init__(self):
        size = self.shuffle_buffer
        if isinstance(size, bool) or not isinstance(size, Integral) or size < 0:
            raise ConfigError(f"Shards(shuffle_buffer=...) must be an integer >= 0 (0: no shuffle), "
                              f"got {self.shuffle_buffer!r}")

    @property
    def decoder(self) -> Callable[[dict], Any]:
        return self.decode or image_label(self.image_keys)

    @property
    def images(self) -> bool:
        """Samples are (image, label) pairs from the default decoder (what --data_on_gpu decodes)."""
        return self.decode is None or getattr(self.decode, "is_image", False)

    def prepare(self, sample: dict) -> Any:
        """The decoded, transformed sample of a raw one (raises what decode or transform raise)."""
        # launcher.presets: decode at the crop's size
        from_bytes = getattr(self.transform, "from_bytes", None)
        if from_bytes is not None and isinstance(self.decoder, image_label):
            data, label = self.decoder.encoded(sample)
            return from_bytes(data), label
        value = self.decoder(sample)
        if self.transform is None:
            return value
        if self.images:
            image, label = value
            return self.transform(image), label
        return self.transform(value)


@dataclass
class Synthetic:
    """Random batches with the structure, shapes and dtypes of a real batch, generated once and
    served every step: no files, no decoding, so a run measures the training step alone
    (`--synthetic_data` swaps a recipe's splits for these). Integer fields (labels, token ids,
    padding markers) are drawn from the real batch's own values, so they stay valid."""

    example: Any  # a collated real batch
    length: int  # samples per epoch
    batch_transform: Callable | None = None  # on the device, per batch

    def batch(self, size: int, seed: int) -> Batch:
        generator = torch.Generator().manual_seed(seed)

        def draw(leaf):
            if not isinstance(leaf, torch.Tensor):
                return leaf
            shape = (size, *leaf.shape[1:])
            if leaf.is_floating_point():
                return torch.randn(shape, generator=generator).to(leaf.dtype)
            values = leaf.flatten() if leaf.numel() else torch.zeros(1, dtype=leaf.dtype)
            return values[torch.randint(0, len(values), shape, generator=generator)]

        return Batch(data=pytree.tree_map(draw, self.example), size=size)


@dataclass
class DataSpec:
    """What a recipe's build_data returns. A split is Shards, a map-style Dataset (torch's, or a
    Hugging Face `datasets.Dataset`), or an IterableDataset (torch's, or a Hugging Face streaming
    one: split by rank and worker as launcher/data/iterable.py says)."""

    train: Shards | Dataset | Any
    val: Shards | Dataset | Any | None = None
    classes: Sequence[str] | None = None  # class names; None: from the shard index or the dataset's .classes
    # per batch on the device, for Dataset splits: a pair's inputs, else the batch
    batch_transform: Callable | None = None
    # list of samples -> batch, in the workers (e.g. padding); None: default_collate
    collate: Collate | None = None
    # an iterable train split: samples in one epoch; None: its len(), else --max_steps steps
    train_samples: int | None = None

    def __post_init__(self):
        """Refuse a transform passed uncalled (`normalize` for `normalize()`): it would be called
        with each image or batch and give back a transform, found only as a confusing error later."""
        count = self.train_samples
        if count is not None and (isinstance(count, bool) or not isinstance(count, Integral) or count < 1):
            raise ConfigError(f"DataSpec(train_samples=...) must be an integer >= 1 (samples in one epoch), got {count!r}")
        for split, source in (("training", self.train), ("validation", self.val)):
            pieces = {"transform": getattr(source, "transform", None), "decode": getattr(source, "decode", None),
                      "batch_transform": getattr(source, "batch_transform", None)}
            for piece, fn in pieces.items():
                _refuse_uncalled(fn, f"the {split} split's {piece}")
        _refuse_uncalled(self.batch_transform, "DataSpec's batch_transform")


def _refuse_uncalled(fn: Any, what: str) -> None:
    """A ConfigError when `fn` makes a transform or decoder rather than being one: a launcher
    preset (launcher.presets, fields, image_label) or a torch/torchvision transform class, uncalled."""
    call = _PRESET_CALLS.get((getattr(fn, "__module__", None), getattr(fn, "__name__", None)))
    if call is None and isinstance(fn, type) and (issubclass(fn, torch.nn.Module)
                                                   or fn.__module__.startswith("torchvision.")):
        call = f"{fn.__name__}(...)"
    if call is not None:
        kind = "decoder" if what.endswith("decode") else "transform"
        raise ConfigError(f"{what} is {fn.__name__}, which makes a {kind} rather than being one: call it "
                          f"({call} not {fn.__name__})")


_PRESET_CALLS = {  # (module, name) -> how to call it; launcher.presets is beside data, so not imported
    ("launcher.presets", "train_transform"): "train_transform(224)",
    ("launcher.presets", "eval_transform"): "eval_transform(224)",
    ("launcher.presets", "normalize"): "normalize()",
    (fields.__module__, "fields"): 'fields("x.npy")',
    (image_label.__module__, "image_label"): "image_label()",
}


def image_folder(root: str, transform: Callable | None = None) -> Dataset:
    """torchvision's ImageFolder (ROOT/CLASS/IMAGE, classes sorted), with a clear error when ROOT
    is missing or empty. Split across ranks like any map-style dataset (DistributedSampler)."""
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(root, transform=transform)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise ConfigError(f"image folder {root}: {str(error).splitlines()[0]}; it must hold one sub-directory of "
                          "images per class (`make demo` writes data/digits/folder)") from None


# ---- streaming ------------------------------------------------------------------------------
