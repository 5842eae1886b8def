"""Realistic JPEG sets for the benchmarks, offline: scikit-learn's two sample photos (427 x 640,
shipped with it) cut and resized to the sizes users bring, with noise so that the files are as
dense as real photos (a smooth photo enlarged 7x would compress to a tenth of a real one).

- `imagenet_sized(count)`: ImageNet's shapes (500 x 375 or 500 x 333, a fifth of them portrait),
  noise of 10 grey levels, quality 94: 90-120 KB each (ImageNet's average is about 110 KB);
- `phone_photos(count)`: 12 MP (4032 x 3024), sensor-like noise, quality 92, 2-4 MB each.

    python scripts/photo_sets.py      # prints the sizes of a few of each
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

PHONE_SIZE = (4032, 3024)  # width, height: a 12 MP phone photo


@functools.cache
def sample_photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images  # seconds to import: only when a set is made

    return tuple(load_sample_images().images)


def _cut(photo: np.ndarray, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A random region of `photo` with the aspect ratio of width x height (at least 60 % of the
    photo's side), resized to that size."""
    rows, columns = photo.shape[:2]
    scale = rng.uniform(0.6, 1.0) * min(rows / height, columns / width)
    h, w = int(height * scale), int(width * scale)
    top, left = int(rng.integers(0, rows - h + 1)), int(rng.integers(0, columns - w + 1))
    return Image.fromarray(photo[top:top + h, left:left + w]).resize((width, height), Image.Resampling.BICUBIC)


def _noisy_jpeg(image: Image.Image, sigma: float, quality: int, rng: np.random.Generator) -> bytes:
    """`image` plus Gaussian noise of `sigma` grey levels (independent per channel, as a sensor's),
    as a JPEG of `quality`."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * sigma
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def imagenet_sized(count: int, seed: int = 0) -> list[bytes]:
    """`count` JPEGs of ImageNet's sizes: 500 x 375 or 333 px, one in five portrait."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    out = []
    for i in range(count):
        long, short = 500, int(rng.choice([333, 375]))
        width, height = (short, long) if rng.random() < 0.2 else (long, short)
        out.append(_noisy_jpeg(_cut(photos[i % len(photos)], width, height, rng), 10.0, 94, rng))
    return out


def phone_photos(count: int, seed: int = 0) -> list[bytes]:
    """`count` 12 MP JPEGs (4032 x 3024), as dense as a phone's: noise of 6 grey levels, quality 92."""
    rng = np.random.default_rng(seed)
    photos = sample_photos()
    return [_noisy_jpeg(_cut(photos[i % len(photos)], *PHONE_SIZE, rng), 6.0, 92, rng) for i in range(count)]


if __name__ == "__main__":
    for name, files in (("ImageNet-sized", imagenet_sized(8)), ("12 MP", phone_photos(2))):
        sizes = [Image.open(io.BytesIO(data)).size for data in files]
        print(f"{name}: {', '.join(f'{w}x{h} {len(d) / 1e3:.0f} KB' for (w, h), d in zip(sizes, files))}")
