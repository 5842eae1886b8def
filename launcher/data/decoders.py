"""Turning a WebDataset sample (extension -> bytes) into a training sample.

`Shards(decode=...)` takes any function of the raw sample dict (`__key__`, `__url__`, and one
bytes value per extension). Presets:

- `image_label(keys, label="cls")` (the default): the first image present among `keys`, decoded
  with PIL, and its label (`cls` an integer class, `value` a float): `(image, label)`; the
  split's `transform` gets the image.
- `fields(...)`: named extensions decoded by their last part, as a value, a tuple or a dict:
  `fields("tokens.npy")`, `fields("features.npy", "target.value")`, `fields(input_ids="ids.npy")`.

Extensions (the part after the last dot): `npy` -> tensor, `pt`/`pth` -> `torch.load` (tensors
only), `txt` -> str, `json` -> its value, `cls` -> int, `value` -> float, `png`/`jpg`/`jpeg`/
`webp` -> PIL image. (A table of our own rather than webdataset's autodecode: it gives tensors
rather than numpy arrays, float labels, and an error naming the missing field.)
"""

from __future__ import annotations

import io
import json
from typing import Any, Callable, Sequence

import numpy
import torch
from PIL import Image


IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


def _image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "npy": lambda data: torch.from_numpy(numpy.load(io.BytesIO(data), allow_pickle=False)),
    "pt": lambda data: torch.load(io.BytesIO(data), weights_only=True),
    "pth": lambda data: torch.load(io.BytesIO(data), weights_only=True),
    "txt": lambda data: data.decode("utf-8"),
    "json": json.loads,
    "cls": lambda data: int(data),
    "value": lambda data: float(data),
    **{ext: _image for ext in IMAGE_EXTENSIONS},
}


def decode_field(sample: dict, extension: str) -> Any:
    if extension not in sample:
        present = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
        raise KeyError(f"no .{extension} (the sample has {present})")
    kind = extension.rsplit(".", 1)[-1]
    decoder = DECODERS.get(kind)
    if decoder is None:
        raise ValueError(f"no decoder for .{extension}; use one of {', '.join(DECODERS)} or pass Shards(decode=FUNCTION)")
    return decoder(sample[extension])


class fields:  # noqa: N801 - used like a function: Shards(decode=fields(...))
    """A decoder of named extensions: one -> the value, several -> a tuple, keywords -> a dict."""

    def __init__(self, *extensions: str, **named: str):
        if not extensions and not named:
            raise ValueError("fields() needs at least one extension, e.g. fields('tokens.npy')")
        if extensions and named:
            raise ValueError("fields() takes extensions either by position (a tuple) or by name (a dict), not both")
        self.extensions, self.named = extensions, named

    def __call__(self, sample: dict) -> Any:
        if self.named:
            return {name: decode_field(sample, ext) for name, ext in self.named.items()}
        values = tuple(decode_field(sample, ext) for ext in self.extensions)
        return values[0] if len(values) == 1 else values

    def __repr__(self) -> str:
        args = [repr(e) for e in self.extensions] + [f"{k}={v!r}" for k, v in self.named.items()]
        return f"fields({', '.join(args)})"


class image_label:  # noqa: N801
    """The default: the first image among `keys` and its integer `label` field: (image, label)."""

    is_image = True

    def __init__(self, keys: Sequence[str] = IMAGE_EXTENSIONS, label: str = "cls"):
        self.keys, self.label = tuple(keys), label

    def image_key(self, sample: dict) -> str:
        key = next((k for k in self.keys if k in sample), None)
        if key is None or self.label not in sample:
            raise ValueError(f"no image ({'/'.join(self.keys)}) or no {self.label}")
        return key

    def __call__(self, sample: dict) -> tuple[Image.Image, int | float]:
        return _image(sample[self.image_key(sample)]), decode_field(sample, self.label)

    def encoded(self, sample: dict) -> tuple[bytes, int | float]:
        """The image's bytes, undecoded, and its label: for a transform that decodes them itself."""
        return sample[self.image_key(sample)], decode_field(sample, self.label)
