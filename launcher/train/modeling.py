"""Model-level helpers: weight initialisation for training from scratch, and the plan's model summary."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from launcher.config import ConfigError

INITS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "xavier_normal": nn.init.xavier_normal_,
    "xavier_uniform": nn.init.xavier_uniform_,
    "trunc_normal": lambda w: nn.init.trunc_normal_(w, std=0.02),
}


def init_weights(model: nn.Module, scheme: str) -> int:
    """Re-initialise every convolution and linear layer's weight with `scheme` (biases to 0, norms
    to weight 1 and bias 0); returns the number of layers initialised."""
    if scheme == "default":
        return 0
    return sum(init_layer(module, scheme) for module in model.modules())


def init_layer(module: nn.Module, scheme: str) -> bool:
    """`scheme` applied to this one module's own parameters (not its children's); True if it is a
    convolution or linear layer."""
    if scheme == "default":
        return False
    init = INITS.get(scheme)
    if init is None:
        raise ConfigError(f"unknown --weight_init={scheme}; choose one of default, {', '.join(INITS)}")
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        init(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        return True
    if (
        isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        and getattr(module, "weight", None) is not None
    ):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    return False


def model_summary(model: nn.Module, io_line: str = "") -> list[str]:
    """Parameters per top-level module (trainable now / frozen), size in MB, and the input -> output
    line the pre-flight check saw (launcher/train/preflight.py)."""
    rows = []
    for name, child in [*model.named_children(), ("(own)", None)]:
        params = list(child.parameters()) if child is not None else list(model.parameters(recurse=False))
        if not params:
            continue
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        size = sum(p.numel() * p.element_size() for p in params) / 2**20
        rows.append((name, total, trainable, total - trainable, size))
    total = sum(r[1] for r in rows)
    trainable = sum(r[2] for r in rows)
    size = sum(r[4] for r in rows)
    width = max([len(r[0]) for r in rows] + [5])
    lines = [f"  {'module':<{width}}  {'params':>12}  {'trainable':>12}  {'frozen':>12}  {'MB':>8}"]
    lines += [f"  {n:<{width}}  {t:>12,}  {tr:>12,}  {f:>12,}  {mb:>8.2f}" for n, t, tr, f, mb in rows]
    lines.append(
        f"  {'total':<{width}}  {total:>12,}  {trainable:>12,}  {total - trainable:>12,}  {size:>8.2f}"
    )
    if io_line:
        lines.append(f"  {io_line}")
    return lines
