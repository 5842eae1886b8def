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

Where no DCT scale covers a training crop (an ImageNet-sized image: a random crop of a 500x375 JPEG
is never twice 224 px), `decode_region` decodes only the crop: libjpeg-turbo skips the IDCT,
upsampling and colour conversion of the rows above it and the columns beside it, and stops after
its last row (`jpeg_skip_scanlines` / `jpeg_crop_scanline`). Neither simplejpeg nor Pillow exposes
that; nvImageCodec's CPU decoder (NVIDIA's, libjpeg-turbo bundled in its wheel, no GPU needed)
does, and its pixels are exactly those of the full-size decode's crop
(tests/unit/test_scaled_decode.py). Where nvImageCodec is not installed (it is a Linux wheel), the
whole image is decoded and cropped, with the same result.
"""

from __future__ import annotations

import glob
import importlib.util
import io
import math
import os
import tempfile

import numpy
import simplejpeg
import torch
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
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


_region_decoders: dict[int, object] = {}  # pid -> nvImageCodec's (module, decoder, params), or None


def decode_region(data: bytes, top: int, left: int, height: int, width: int) -> torch.Tensor | None:
    """Rows top..top+height and columns left..left+width of a YCbCr/gray JPEG, RGB uint8 CxHxW,
    decoded from those rows and columns only: the same pixels as `decode_rgb(data)` cropped there.
    None where nvImageCodec is missing, or the bytes are not a whole JPEG it decodes (the caller then
    decodes the image whole, and refuses it if damaged)."""
    loaded = _region_decoders.get(os.getpid(), ...)
    if loaded is ...:  # one decoder per process: a DataLoader worker forks without its threads
        loaded = _region_decoders[os.getpid()] = _load_region_decoder()
    # Without its end marker a JPEG is likely cut short; decoding stops at the crop's last row, so it
    # would never see that: such files take the full-size path, which counts them as unreadable.
    if loaded is None or data[:3] != JPEG_MAGIC or not data.endswith(JPEG_END):
        return None
    nvimgcodec, decoder, params = loaded
    try:
        if simplejpeg.decode_jpeg_header(data)[2] not in SCALED_COLORSPACES:
            return None
        region = nvimgcodec.Region(top, left, top + height, left + width)
        image = decoder.decode(nvimgcodec.CodeStream(data).get_sub_code_stream(region=region), params=params)
    except (ValueError, RuntimeError):  # damaged: the full-size path decides, as for any JPEG
        return None
    if image is None:
        return None
    return torch.from_numpy(numpy.asarray(image.cpu())).permute(2, 0, 1)


def _load_region_decoder():
    """nvImageCodec's libjpeg-turbo decoder on the CPU, with PIL's accurate chroma upsampling and
    no EXIF rotation (as simplejpeg and PIL decode); None where the package is not installed.

    Imported with only its libjpeg-turbo extension on the extension path: its GPU extensions would
    each print a line to stdout, in every process, on a machine without nvJPEG, nvJPEG2000 or
    nvTIFF. Its log stays quiet unless PYNVIMGCODEC_VERBOSITY says otherwise: a damaged JPEG is the
    full-size path's to report."""
    spec = importlib.util.find_spec("nvidia.nvimgcodec") if importlib.util.find_spec("nvidia") else None
    if spec is None or spec.origin is None:
        return None
    extension = glob.glob(os.path.join(os.path.dirname(spec.origin), "extensions", "libjpeg_turbo_ext.so*"))
    if not extension:
        return None
    saved = {name: os.environ.get(name) for name in ("NVIMGCODEC_EXTENSIONS_PATH", "PYNVIMGCODEC_VERBOSITY")}
    with tempfile.TemporaryDirectory() as only_turbo:
        os.symlink(extension[0], os.path.join(only_turbo, os.path.basename(extension[0])))
        os.environ["NVIMGCODEC_EXTENSIONS_PATH"] = only_turbo
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
        try:
            from nvidia import nvimgcodec

            decoder = nvimgcodec.Decoder(
                device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)],
                max_num_cpu_threads=1,
                options=":fancy_upsampling=1",
            )
        except (ImportError, AttributeError, RuntimeError):  # an older or broken install
            return None
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return nvimgcodec, decoder, nvimgcodec.DecodeParams(apply_exif_orientation=False)
