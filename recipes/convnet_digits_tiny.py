"""convnet_digits at a size that trains on CPU in seconds (used by the tests)."""

from launcher import variant
from recipes.convnet_digits import Config as Base
from recipes.convnet_digits import build_data, build_model, callbacks  # noqa: F401

Config = variant(
    Base,
    image_size=8,
    channels=8,
    epochs=3,
    batch_size=32,
    lr_step_size=1,
    num_workers=0,
    log_every=5,
    output_dir="runs/convnet_digits_tiny",
    wandb_mode="disabled",
)
