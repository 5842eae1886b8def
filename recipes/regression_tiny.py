"""regression at a size that trains on CPU in seconds (used by the tests).

python -m launcher recipes/regression_tiny
"""

from launcher import variant
from recipes.regression import Config as Base
from recipes.regression import build_data, build_model, predict_sample  # noqa: F401

Config = variant(
    Base,
    hidden=32,
    dropout=0.0,
    epochs=2,
    batch_size=32,
    num_workers=0,
    log_every=2,
    output_dir="runs/regression_tiny",
    wandb_mode="disabled",
)
