"""Fine-tune a pretrained torchvision ResNet on all ten digits.

    python -m launcher recipes/resnet_finetune --weights=runs/demo/pretrain
    accelerate launch -m launcher recipes/resnet_finetune --weights=...

The stem and the first stages stay frozen (BatchNorm statistics fixed). Below the new 10-class
head (at `head_lr_scale` x lr) each stage trains at lr x layer_decay^depth, depth 1 for layer4;
the `unfreeze` stages start frozen and join at `unfreeze_epoch` with their LR warming up from 0.
Biases and BatchNorm weights get no weight decay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torchvision

from launcher import ConfigError, Group, Schedule, TrainConfig, layer_decay, load_weights
from recipes.digits import digit_shards

STAGES = {
    "layer4": ["layer4"],
    "layer3": ["layer3"],
    "layer2": ["layer2"],
    "layer1": ["layer1"],
    "stem": ["conv1", "bn1"],
}  # a torchvision ResNet's stages, from the head down


@dataclass
class Config(TrainConfig):
    data_dir: str = "data/digits"  # demo shards (scripts/make_demo_data.py)
    image_size: int = 32  # digits are resized from 8x8 to this many pixels square
    arch: str = "resnet18"  # a torchvision ResNet name
    #: initial weights: a launcher run's output_dir, a .pth/.pt/.safetensors file, or a torchvision name
    #: (IMAGENET1K_V1) from the hub cache; "" = random
    weights: str = ""
    num_classes: int = 10  # the head is replaced to this many classes
    #: modules (name patterns) frozen for the whole run
    frozen: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2")
    #: stages (layer1-4, stem) frozen at first, trained from unfreeze_epoch
    unfreeze: tuple[str, ...] = ("layer3",)
    unfreeze_epoch: int = 2  # the epoch at which the unfreeze stages start training
    unfreeze_step: int = 0  # > 0: unfreeze at this optimizer step instead of unfreeze_epoch
    unfreeze_warmup_steps: int = 10  # optimizer steps over which an unfrozen stage's LR rises from 0
    layer_decay: float = 0.5  # stage at depth d below the head trains at lr x layer_decay^d
    head_lr_scale: float = 10.0  # the head's LR = lr x this
    no_decay_norm_bias: bool = True  # biases and BatchNorm weights get no weight decay
    output_dir: str = "runs/resnet_finetune"
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 5
    max_grad_norm: float = 1.0


def build_model(cfg: Config):
    model = torchvision.models.get_model(cfg.arch, weights=None, num_classes=cfg.num_classes)
    if cfg.weights:
        load_weights(model, cfg.weights, arch=cfg.arch, head="fc")
    return model


def build_data(cfg: Config):
    return digit_shards(cfg.data_dir, "train", "val", cfg.image_size)


def build_schedule(cfg: Config, model) -> Schedule:
    unknown = sorted(set(cfg.unfreeze) - set(STAGES))
    if unknown:
        raise ConfigError(f"--unfreeze names {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    when = (
        dict(unfreeze_step=cfg.unfreeze_step)
        if cfg.unfreeze_step
        else dict(unfreeze_epoch=cfg.unfreeze_epoch)
    )
    stages = [
        Group(name, patterns, frozen=True, unfreeze_warmup_steps=cfg.unfreeze_warmup_steps, **when)
        if name in cfg.unfreeze
        else Group(name, patterns)
        for name, patterns in STAGES.items()
    ]
    return Schedule(
        groups=[
            Group("frozen", cfg.frozen, frozen=True),  # first match wins: these never train
            Group("head", ["fc"], lr_scale=cfg.head_lr_scale),
            *layer_decay(stages, cfg.layer_decay),
        ],
        no_decay_norm_bias=cfg.no_decay_norm_bias,
    )
