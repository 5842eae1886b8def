"""llm_finetune at a size that trains on CPU in seconds (used by the tests): a few modules'
docstrings, short examples, a stand-in model written by scripts/make_tiny_llama.py.

    python scripts/make_tiny_llama.py --out data/tiny_llama
    python -m launcher recipes/llm_finetune_tiny --model_dir=data/tiny_llama
    python -m launcher recipes/llm_finetune_tiny --model_dir=data/tiny_llama --lora_rank=4 --lr=1e-2
"""

from launcher import variant
from recipes.llm_finetune import Config as Base
from recipes.llm_finetune import (  # noqa: F401
    build_data,
    build_model,
    build_schedule,
    compute_loss,
    shard_units,
    tokenizer_dir,
)

Config = variant(
    Base,
    model_dir="data/tiny_llama",
    data_dir="data/docstrings_tiny",
    modules=("textwrap", "shlex", "heapq", "queue", "base64", "contextlib"),
    block_size=128,
    batch_size=8,
    max_steps=12,
    warmup_steps=2,
    lr=3e-3,
    lora_dropout=0.0,
    log_every=2,
    output_dir="runs/llm_finetune_tiny",
    wandb_mode="disabled",
)
