"""Decoding shard JPEGs at the scale the presets' crop needs (launcher/data/scaled_decode.py,
`TrainCrop.from_bytes`, `EvalCrop.from_bytes`): the same crops as the full-size path, close
pixels, bitwise resume, and the fallbacks to PIL for what simplejpeg does not scale."""

from __future__ import annotations

import io
import itertools
import json
import os

import numpy
import pytest
import simplejpeg
import torch
from PIL import Image

from launcher.data import scaled_decode
from launcher.data.layout import Position, derive_seed
from launcher.data.loader import SplitLoader
from launcher.data.scaled_decode import covering_size, decode_region, decode_rgb, image_size
from launcher.data.spec import Shards
from launcher.data.stream import seed_augmentation
from launcher.data.writer import write_shards
from launcher.presets import eval_transform, train_transform


def encode(array: numpy.ndarray, fmt: str = "JPEG", mode: str | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.clip(0, 255).astype(numpy.uint8), mode).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A 1536x1152 JPEG with photo-like content: a smooth random colour field (features about
    100 px across) with mild sensor-like noise."""
    rng = numpy.random.default_rng(0)
    field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=numpy.uint8)).resize(
        (1536, 1152), Image.BICUBIC
    )
    return encode(numpy.asarray(field, numpy.float32) + rng.normal(0, 3, (1152, 1536, 3)), quality=90)


@pytest.fixture(scope="module")
def ramps() -> bytes:
    """A 1024x768 JPEG whose red channel is x (0..255 across) and green y (0..255 down)."""
    y, x = numpy.mgrid[0:768, 0:1024]
    return encode(
        numpy.stack([x * 255 / 1023, y * 255 / 767, numpy.full(x.shape, 128)], -1), quality=95, subsampling=0
    )


def both_paths(transform, data: bytes, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full-size path, scaled path) outputs for one per-sample seed."""
    seed_augmentation(seed)
    full = transform(Image.open(io.BytesIO(data)))
    seed_augmentation(seed)
    return full, transform.from_bytes(data)


def decode_factor(transform, data: bytes, seed: int) -> float:
    """Full-size pixels per decoded pixel for this seed's crop (as from_bytes picks it)."""
    height, width = image_size(data)
    seed_augmentation(seed)
    box = transform.crop.make_params([torch.empty(0, height, width)])
    decoded, _, _, _ = simplejpeg.decode_jpeg_header(
        data,
        covering_size(transform.size, box["height"], height),
        covering_size(transform.size, box["width"], width),
        2.0,
    )
    return height / decoded


def extent(profile: torch.Tensor, pixels: int) -> tuple[float, float]:
    """(centre, span) in full-size pixels of the region whose ramp profile (0..255 over `pixels`)
    an output row or column shows, whichever way it was flipped."""
    full_scale, size = (pixels - 1) / 255, len(profile)
    span = abs(profile[-1] - profile[0]).item() * full_scale * size / (size - 1)
    return profile.mean().item() * full_scale, span


def test_the_crop_covers_the_same_region_within_a_pixel_at_the_decoded_scale(ramps):
    factors = set()
    for transform, seed in itertools.product((train_transform(32), train_transform(192)), range(5)):
        full, scaled = both_paths(transform, ramps, seed)
        factor = decode_factor(transform, ramps, seed)
        factors.add(factor)
        if factor == 1:  # nothing to scale: the same pixels
            assert torch.equal(full, scaled)
            continue
        # Red = x: the columns' profile; green = y: the rows'. Centre and span in full-size pixels.
        for channel, pixels, dim in ((0, 1024, 0), (1, 768, 1)):
            (full_centre, full_span), (centre, span) = (
                extent(t[channel].float().mean(dim=dim), pixels) for t in (full, scaled)
            )
            # One decoded pixel is `factor` full-size ones; one ramp level is 4 (x) or 3 (y) pixels.
            assert abs(centre - full_centre) <= factor + 1, (seed, channel, factor, centre, full_centre)
            assert abs(span - full_span) <= 2 * factor + 2, (seed, channel, factor, span, full_span)
    assert max(factors) >= 4 and min(factors) == 1, factors  # both paths taken, down to 1/4 or less


def test_scaled_output_is_close_to_the_full_size_path(photo):
    transform = train_transform(64)
    differences = []
    for seed in range(8):
        full, scaled = both_paths(transform, photo, seed)
        assert scaled.dtype == torch.uint8 and scaled.shape == full.shape == (3, 64, 64)
        if decode_factor(transform, photo, seed) > 1:
            differences.append((scaled.float() - full.float()).abs().mean().item())
    # Mean absolute difference per image, uint8 units (measured 1.1-2.6 here): the DCT-domain
    # downscale filters differently from the bilinear antialias one, and the crop's edges move by
    # up to half a decoded pixel.
    assert differences and max(differences) < 4.0, differences
    evaluate = eval_transform(64)
    full, scaled = evaluate(Image.open(io.BytesIO(photo))), evaluate.from_bytes(photo)
    assert scaled.shape == full.shape == (3, 64, 64) and (scaled.float() - full.float()).abs().mean() < 3.0


@pytest.fixture(scope="module")
def imagenet_sized(photo) -> dict[str, bytes]:
    """A 500x375 window of the photo, the size of most ImageNet images, in the JPEG layouts cameras
    and encoders write: chroma 4:2:0, 4:2:2, 4:4:4, progressive, and gray."""
    window = numpy.asarray(Image.open(io.BytesIO(photo)).crop((301, 207, 801, 582)))
    return {
        "4:2:0": encode(window, quality=90),
        "4:2:2": encode(window, quality=90, subsampling=1),
        "4:4:4": encode(window, quality=90, subsampling=0),
        "progressive": encode(window, quality=90, progressive=True),
        "gray": encode(window[..., 1], quality=90),
    }


def test_a_crop_no_scale_covers_is_decoded_alone_to_the_full_decodes_pixels(imagenet_sized):
    """Only the crop's rows and columns are decoded (nvImageCodec, installed with the launcher on
    Linux), and they are the full-size decode's pixels there: the same output as the full-size path,
    not a close one."""
    for name, data in imagenet_sized.items():
        full = decode_rgb(data)
        boxes = ((0, 0, 375, 500), (11, 37, 200, 301), (174, 3, 201, 497), (9, 13, 3, 5))
        for top, left, height, width in boxes:
            region = decode_region(data, top, left, height, width)
            assert region is not None, name
            assert torch.equal(region, full[:, top : top + height, left : left + width]), (name, top, left)
    transform = train_transform(224)
    data = imagenet_sized["4:2:0"]
    for seed in range(6):
        full, scaled = both_paths(transform, data, seed)
        assert decode_factor(transform, data, seed) == 1 and torch.equal(full, scaled), seed
    for bad in (data[:20000], b"\xff\xd8\xff" + b"\x00" * 64):
        assert decode_region(bad, 0, 0, 8, 8) is None
        with pytest.raises(OSError):  # PIL's error, which the stream counts, as on the full-size path
            transform.from_bytes(bad)


def test_without_the_region_decoder_the_image_is_decoded_whole_to_the_same_output(
    imagenet_sized, monkeypatch
):
    transform, data = train_transform(224), imagenet_sized["4:2:0"]
    outputs = []
    for _ in range(2):
        seed_augmentation(3)
        outputs.append(transform.from_bytes(data))
        monkeypatch.setitem(scaled_decode._region_decoders, os.getpid(), None)  # as where it is not installed
    assert decode_region(data, 0, 0, 8, 8) is None and torch.equal(*outputs)


def small(mode: str) -> numpy.ndarray:
    rng = numpy.random.default_rng(1)
    shape = {"L": (48, 40), "RGB": (48, 40, 3), "RGBA": (48, 40, 4), "CMYK": (48, 40, 4)}[mode]
    return rng.integers(0, 256, shape).astype(numpy.uint8)


@pytest.mark.parametrize(
    "fmt,mode",
    [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("JPEG", "L"), ("JPEG", "CMYK"), ("WEBP", "RGB")],
)
def test_other_formats_and_colour_modes_give_what_the_full_size_path_gives(fmt, mode):
    data = encode(small(mode), fmt, mode)
    for transform in (train_transform(24), eval_transform(24)):
        full, scaled = both_paths(transform, data, seed=5)
        assert scaled.shape == (3, 24, 24) and torch.equal(scaled, full), (fmt, mode)
    assert decode_rgb(data).shape == (3, 48, 40)


def test_undecodable_images_raise_as_on_the_full_size_path(photo):
    for bad in (photo[: len(photo) // 2], photo[:200], b"\xff\xd8\xff" + b"\x00" * 64, b"not an image"):
        with pytest.raises(OSError):  # PIL's, which the stream records as an unreadable sample
            train_transform(24).from_bytes(bad)


def test_shards_use_the_scaled_path_and_a_resume_is_bitwise(tmp_path, photo):
    """The loader's batches (from 2 workers) are from_bytes with each sample's seed, the same after a
    resume; a truncated JPEG is skipped and counted."""
    rng = numpy.random.default_rng(2)
    big = Image.open(io.BytesIO(photo))
    images = [
        encode(numpy.asarray(big.crop((left, top, left + 640, top + 480))), quality=85)
        for left, top in rng.integers(0, 400, (11, 2))
    ]
    samples = [{"__key__": f"p{i:02d}", "jpg": data, "cls": i % 2} for i, data in enumerate(images)]
    samples.insert(5, {"__key__": "cut", "jpg": images[0][: len(images[0]) // 2], "cls": 0})
    write_shards(samples, str(tmp_path), max_count=6, classes=["a", "b"])
    transform = train_transform(24, scale=(0.3, 1.0))

    def loader(workers: int, start: Position | None = None) -> list:
        split = SplitLoader(
            Shards(str(tmp_path), transform, shuffle_buffer=4),
            rank=0,
            world=1,
            seed=7,
            batch_size=2,
            num_workers=workers,
            training=True,
            batches_per_epoch=5,
        )
        return list(split.loader(1, start))

    full = loader(2)
    assert sum(b.repeated for b in full) == 0  # 10 of 11 samples: all from the first pass (seeds' repeat 0)
    for key, image in ((k, image) for b in full for k, image in zip(b.keys, b.data[0])):
        seed_augmentation(derive_seed(7, "augment", 1, key, 0))
        assert torch.equal(image, transform.from_bytes(images[int(key[1:])])), key
    validation = SplitLoader(
        Shards(str(tmp_path), transform), rank=0, world=1, seed=7, batch_size=4, num_workers=0, training=False
    )
    assert [e["key"] for b in validation.loader(0) for e in b.errors] == ["cut"]  # skipped and counted
    position = Position(1)
    for b in itertools.islice(loader(2), 2):
        position.advance(b)
    position = Position.from_dict(json.loads(json.dumps(position.to_dict())))
    resumed = full[:2] + loader(2, position)
    assert [b.keys for b in resumed] == [b.keys for b in full]
    assert all(torch.equal(a.data[0], b.data[0]) for a, b in zip(resumed, full))
