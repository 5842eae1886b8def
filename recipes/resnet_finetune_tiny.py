"""resnet_finetune at a size that runs on CPU in seconds (used by the tests): layer3 unfreezes at step 3."""

from launcher import variant
from recipes.resnet_finetune import Config as Base
from recipes.resnet_finetune import build_data, build_model, build_schedule  # noqa: F401

Config = variant(
    Base,
    image_size=16,
    batch_size=16,
    max_steps=6,
    num_workers=0,
    warmup_steps=1,
    unfreeze_step=3,
    unfreeze_warmup_steps=2,
    log_every=2,
    output_dir="runs/resnet_finetune_tiny",
    wandb_mode="disabled",
)
