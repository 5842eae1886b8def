"""scripts/bench_lm.py's FLOPs per token, checked against torch's FlopCounterMode on a real Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from launcher.overrides import apply_overrides
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
    # every matmul of forward and backward (torch counts both gradients of each linear layer) ...
    linear = sum(
        flops
        for mode in (forward, backward)
        for op, flops in mode.get_flop_counts()["Global"].items()
        if str(op) == "aten.mm"
    )
    assert linear / tokens == 6 * sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    # ... plus attention at 3 x its forward (flash attention's backward recomputes the scores: not model
    # FLOPs): an attention kernel, or where torch runs SDPA's math path (2.7 on CPU) its batched
    # matmuls, the rotary embedding's small one among them (under 0.1 %)
    attention = sum(
        flops for op, flops in forward.get_flop_counts()["Global"].items() if str(op) != "aten.mm"
    )
    assert flops_per_token(model, cfg.seq_len) == pytest.approx(
        linear / tokens + 3 * attention / tokens, rel=1e-3
    )
    assert 3 * attention / tokens == pytest.approx(
        12 * config.num_hidden_layers * config.hidden_size * cfg.seq_len, rel=1e-3
    )
