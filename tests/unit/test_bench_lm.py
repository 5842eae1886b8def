"""scripts/bench_lm.py's FLOPs per token, checked against torch's FlopCounterMode on a real Llama."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from launcher.config import apply_overrides
from recipes import llm_bench
from scripts.bench_lm import flops_per_token


def test_flops_per_token_are_the_matmuls_and_attention_torch_counts_in_a_training_step():
    cfg = apply_overrides(llm_bench.Config(), {"size": "tiny", "seq_len": 32})
    torch.manual_seed(0)
    model = llm_bench.build_model(cfg)
    batch, config = 2, model.config
    with FlopCounterMode(display=False) as forward:
        logits = model(input_ids=torch.randint(config.vocab_size, (batch, cfg.seq_len))).logits
    with FlopCounterMode(display=False) as backward:
        logits.float().sum().backward()
    tokens = batch * cfg.seq_len
    counts: dict[str, int] = {}
    for mode in (forward, backward):
        for op, flops in mode.get_flop_counts()["Global"].items():
            if "attention" not in str(op):
                counts[str(op)] = counts.get(str(op), 0) + flops
    attention = sum(flops for op, flops in forward.get_flop_counts()["Global"].items() if "attention" in str(op))
    # every matmul of forward and backward (torch counts both gradients of each linear layer) ...
    assert counts.keys() == {"aten.mm"} and counts["aten.mm"] / tokens == 6 * sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    # ... plus attention at 3 x its forward (flash attention's backward recomputes the scores: not model FLOPs)
    assert flops_per_token(model, cfg.seq_len) == counts["aten.mm"] / tokens + 3 * attention / tokens
    assert 3 * attention / tokens == 12 * config.num_hidden_layers * config.hidden_size * cfg.seq_len
