"""resnet_pretrain at a size that runs on CPU in seconds (used by the tests)."""

from launcher import variant
from recipes.resnet_pretrain import Config as Base
from recipes.resnet_pretrain import build_data, build_model  # noqa: F401

Config = variant(
    Base,
    image_size=16,
    batch_size=16,
    max_steps=4,
    num_workers=0,
    warmup_steps=1,
    log_every=2,
    output_dir="runs/resnet_pretrain_tiny",
    wandb_mode="disabled",
)
