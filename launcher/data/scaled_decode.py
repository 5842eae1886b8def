"""Decoding an image only as large as a transform's output needs (what `launcher.presets` do
for shard images).

A JPEG stores 8x8 blocks of DCT coefficients; libjpeg-turbo can run the inverse DCT at 1/2, 1/4
(3/8) or 1/8 of the size, which skips most of the IDCT, chroma upsampling and colour conversion
of a large image and hands back far fewer pixels to crop and resize. The Huffman decoding of
every byte stays. simplejpeg (libjpeg-turbo, bundled in its wheels) does it with `min_height` /
`min_width`; measured per core against Pillow's `draft` and torchvision's full-size decode in
scripts/bench_data.py (BENCHMARKS.md). Other images (PNG, WebP, CMYK JPEGs, a JPEG that
simplejpeg refuses) are decoded by PIL at full size, converted to RGB as `presets.to_rgb` does;
what PIL cannot decode raises, and the stream counts the sample as unreadable.
"""

from __future__ import annotations

import io
import math

import numpy
import simplejpeg
import torch
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
# simplejpeg's RGB output matches PIL's for these; CMYK/YCCK go to PIL
SCALED_COLORSPACES = ("YCbCr", "Gray", "RGB")
# Downscale by 2 or more, or not at all: libjpeg-turbo's scales between 1/2 and 1 (5/8 .. 7/8)
# have no SIMD IDCT and decode slower than full size (simplejpeg's docstring says so too).
MIN_FACTOR = 2.0


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) in pixels from the image's header, without decoding it."""
    if data[:3] == JPEG_MAGIC:
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return height, width
        except ValueError:  # a header simplejpeg refuses: PIL may still read it, or raise
            pass
    width, height = Image.open(io.BytesIO(data)).size
    return height, width


def decode_rgb(data: bytes, min_height: int = 0, min_width: int = 0) -> torch.Tensor:
    """The image as an RGB uint8 CxHxW tensor (channels-last strides, as PILToTensor gives), at the
    smallest JPEG scale that is still at least `min_height` x `min_width` (0: full size);
    anything but a YCbCr/gray JPEG at full size."""
    array = _scaled_jpeg(data, min_height, min_width) if data[:3] == JPEG_MAGIC else None
    if array is None:
        image = Image.open(io.BytesIO(data))
        # writable, as PILToTensor's
        array = numpy.array(image if image.mode == "RGB" else image.convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)


def _scaled_jpeg(data: bytes, min_height: int, min_width: int) -> numpy.ndarray | None:
    """HxWx3 uint8, or None where PIL should decode it (CMYK, or bytes simplejpeg refuses)."""
    try:
        _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in SCALED_COLORSPACES:
            return None
        # The accurate IDCT and chroma upsampling, as PIL's: at full scale the pixels are PIL's.
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min_height, min_width=min_width,
                                      min_factor=MIN_FACTOR, fastdct=False, fastupsample=False)
    except ValueError:  # corrupt or truncated (strict): PIL decides, as on the full-size path
        return None


def covering_size(size: int, region: int, full: int) -> int:
    """The smallest full-image side (pixels) at which `region` pixels of a `full`-pixel side still
    span `size` output pixels: decoding at least this large never upsamples the region."""
    return math.ceil(full * size / max(region, 1))


def to_rgb(image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    """PIL image -> RGB; a tensor (decoded on the device as RGB, `--data_on_gpu`) passes through.
    The presets' first step (launcher/presets.py), recognised by batch_crops."""
    return image.convert("RGB") if isinstance(image, Image.Image) else image
