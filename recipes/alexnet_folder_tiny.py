"""alexnet_folder at a size that trains on CPU in well under a minute (used by the tests)."""

from launcher import variant
from recipes.alexnet_folder import Config as Base
from recipes.alexnet_folder import build_data, build_model  # noqa: F401

Config = variant(
    Base,
    epochs=2,
    batch_size=32,
    classifier_width=256,
    num_workers=0,
    warmup_steps=5,
    log_every=5,
    output_dir="runs/alexnet_folder_tiny",
    wandb_mode="disabled",
)
