"""gru_classifier at a size that trains on CPU in seconds (used by the tests).

python -m launcher recipes/gru_classifier_tiny
"""

from launcher import variant
from recipes.gru_classifier import Config as Base
from recipes.gru_classifier import build_data, build_model, predict_sample  # noqa: F401

Config = variant(
    Base,
    embed_dim=16,
    hidden=32,
    max_len=64,
    lines_per_class=200,
    epochs=4,
    batch_size=32,
    lr=2e-2,
    num_workers=0,
    log_every=5,
    output_dir="runs/gru_classifier_tiny",
    wandb_mode="disabled",
)
