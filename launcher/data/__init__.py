"""Data: what a split is (DataSpec, Shards, decoders), how its samples stream from tar
shards or a map-style dataset to whole batches per rank and worker (layout, stream, loader,
tar reader, index), what a batch is and how it reaches the device, and the shard writer.

The recipe-facing names are importable from here (and from `launcher`)."""

from launcher.data.spec import DataSpec, Shards, Synthetic, image_folder

__all__ = ["DataSpec", "Shards", "Synthetic", "image_folder"]
