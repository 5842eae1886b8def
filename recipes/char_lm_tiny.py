"""char_lm at a size that trains on CPU in seconds (used by the tests).

python scripts/make_text_shards.py --out data/text
python -m launcher recipes/char_lm_tiny
"""

from launcher import variant
from recipes.char_lm import Config as Base
from recipes.char_lm import build_data, build_model, callbacks, compute_loss  # noqa: F401

Config = variant(
    Base,
    block_size=32,
    n_layer=2,
    n_head=2,
    n_embd=32,
    batch_size=8,
    max_steps=20,
    warmup_steps=2,
    lr=3e-3,
    sample_tokens=16,
    num_workers=0,
    log_every=5,
    output_dir="runs/char_lm_tiny",
    wandb_mode="disabled",
)
