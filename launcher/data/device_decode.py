"""Image decoding on the training device (`--data_on_gpu`): DataLoader workers only read shards and
pass each batch's encoded bytes on; the main process decodes the JPEGs with torchvision's
`decode_jpeg(device=...)` (nvJPEG on a GPU, one batched call), then runs the split's per-sample
transform on the decoded uint8 tensors where they are. This frees the host CPUs, which on a
GPU node with few cores per GPU are what keep the device waiting.

On an accelerator, the presets' transforms (RandomResizedCrop + flip; Resize + CenterCrop) run as
one batched kernel (launcher/data/batch_crops.py: one box per sample, one roi_align), not a few
small kernels per sample launched one after another. On a CPU there are no launches to save, and
the per-sample transforms, which resize only the crop with vectorised uint8 code, are faster (64
ImageNet-sized images to 224 px, one thread: 400 img/s against 22 for the batched path, whose
padding and roi_align touch every pixel in float); so there they stay per sample.
Any other per-sample transform gets a uint8 CHW tensor on the device instead of a PIL image:
torchvision v2 transforms take either. Augmentations draw their parameters from torch's CPU
generator, seeded per sample exactly as the workers seed it, so a run or a resume sees the same
crops and flips either way. Images other than JPEG are decoded on the host (`decode_image`); an
undecodable one is skipped and counted like a bad sample in a worker.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from launcher.data.batch import Batch
from launcher.data.batch_crops import batch_crops, crop_batch


JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: torch.Tensor) -> bool:
    """Whether encoded image bytes (a uint8 tensor) are a JPEG, by its first three bytes."""
    return bytes(data[:3].tolist()) == JPEG_MAGIC


class EncodedBatch:
    """A batch of encoded images, gathered in a worker: one flat byte tensor (one shared-memory
    segment to cross to the main process, not one per image) and where each image starts."""

    def __init__(self, worker: int, size: int):
        self.worker, self.size = worker, size
        self._reset()

    def _reset(self) -> None:
        self.chunks: list[bytes] = []
        self.labels: list[int] = []
        self.keys: list[str] = []
        self.urls: list[str] = []
        self.seeds: list[int | None] = []
        self.repeats: list[bool] = []  # read in a repeat pass: an error there was counted in the first
        self.errors: list[dict] = []
        self.repeated = 0

    @property
    def count(self) -> int:
        return len(self.chunks)

    def add(self, item: tuple[bytes, int, str, str, int | None], repeated: bool) -> None:
        data, label, key, url, seed = item
        self.chunks.append(data)
        self.labels.append(label)
        self.keys.append(key)
        self.urls.append(url)
        self.seeds.append(seed)
        self.repeats.append(repeated)
        self.repeated += repeated

    def emit(self, worker_batches: int, position: list[int]) -> Batch:
        offsets = [0]
        for chunk in self.chunks:
            offsets.append(offsets[-1] + len(chunk))
        encoded = {"bytes": torch.frombuffer(bytearray(b"".join(self.chunks)), dtype=torch.uint8),
                   "offsets": offsets, "seeds": self.seeds, "urls": self.urls, "repeats": self.repeats,
                   "targets": torch.tensor(self.labels, dtype=torch.long)} if self.chunks else None
        batch = Batch(size=self.count, keys=self.keys, errors=self.errors, repeated=self.repeated, worker=self.worker,
                      worker_batches=worker_batches, position=position, encoded=encoded)
        self._reset()
        return batch


def decode_batch(batch: Batch, transform, device: torch.device, seed_sample) -> Batch:
    """`batch` with its data, (images, targets), decoded and transformed on `device`; undecodable
    images dropped (with their targets and keys) and added to the batch's error records (once per
    epoch). `seed_sample(seed)` seeds one sample's augmentation (None: validation, no seeding)."""
    encoded = batch.encoded
    if encoded is None:
        return batch
    flat, offsets = encoded["bytes"], encoded["offsets"]
    data = [flat[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    images = _decode(data, device)
    keep, errors = [], list(batch.errors)
    for i, image in enumerate(images):
        if not isinstance(image, Exception):
            keep.append(i)
        elif not encoded["repeats"][i]:  # errors count once per epoch, as in the workers
            errors.append({"shard": encoded["urls"][i], "key": batch.keys[i],
                           "reason": f"{type(image).__name__}: {image}"[:200], "samples": 1})
    seeds = [encoded["seeds"][i] for i in keep]
    inputs = transform_images([images[i] for i in keep], seeds, transform, seed_sample,
                          batched=device.type != "cpu") if keep else None
    data = (inputs, encoded["targets"][keep] if len(keep) < len(images) else encoded["targets"]) if keep else None
    return replace(batch, data=data, size=len(keep), keys=[batch.keys[i] for i in keep], errors=errors, encoded=None)


def transform_images(images: list[torch.Tensor], seeds: list[int | None], transform, seed_sample,
                 batched: bool) -> torch.Tensor:
    """The batch of `images` through the per-sample `transform`, each seeded by its seed: with
    `batched`, the presets' crops as one batched kernel; any other transform sample by sample."""
    crops = batch_crops(transform) if transform is not None and batched else None
    boxes, flips, outputs = [], [], []
    for image, seed in zip(images, seeds):
        if seed is not None:
            seed_sample(seed)
        if crops is None:
            outputs.append(transform(image) if transform is not None else image)
        else:
            box, flip = crops.draw(image)
            boxes.append(box)
            flips.append(flip)
    if crops is None:
        return torch.stack(outputs)
    return crop_batch(images, torch.tensor(boxes), torch.tensor(flips), crops.size)


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """RGB uint8 CHW tensors on `device`, or the exception for an image that would not decode.
    JPEGs go in one batched call (nvJPEG on a GPU); if it fails, one by one to find the bad ones."""
    # only with --data_on_gpu (launcher.presets)
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    jpegs = [i for i, d in enumerate(data) if is_jpeg(d)]
    images: list = [None] * len(data)
    with decoding_stream(device) as settle:
        try:
            decoded = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
            for i, image in zip(jpegs, decoded):
                images[i] = image
        except RuntimeError:
            for i in jpegs:
                images[i] = _one(lambda d: decode_jpeg(d, mode=ImageReadMode.RGB, device=device), data[i])
        settle(images)
    for i, image in enumerate(images):
        if image is None:  # PNG, WebP, ... or not an image: decoded on the host
            images[i] = _one(lambda d: decode_image(d, mode=ImageReadMode.RGB).to(device, non_blocking=True), data[i])
    return images


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


@contextlib.contextmanager
def decoding_stream(device: torch.device):
    """On a GPU, nvJPEG decodes into tensors allocated from a stream of their own. torchvision
    allocates the outputs on the caller's current stream and nvJPEG writes them from another one
    without waiting (pytorch/vision#9606): from the training stream's pool the decoder is handed
    blocks that the previous step's queued kernels still read, and overwrites them (wrong numbers,
    a NaN loss a few steps in). Yields `settle(images)`, which marks each decoded image as used by
    the training stream (its block is not reused before that stream is past it) and makes the
    training stream wait for the decoding one."""
    if device.type != "cuda":
        yield lambda images: None
        return
    main = torch.cuda.current_stream(device)
    stream = _STREAMS.setdefault(device, torch.cuda.Stream(device))

    def settle(images: list) -> None:
        for image in images:
            if isinstance(image, torch.Tensor):
                image.record_stream(main)
        main.wait_stream(stream)

    with torch.cuda.stream(stream):
        yield settle


def _one(decode, data: torch.Tensor) -> torch.Tensor | Exception:
    try:
        return decode(data)
    except RuntimeError as error:  # torchvision reports undecodable bytes as RuntimeError
        return error
