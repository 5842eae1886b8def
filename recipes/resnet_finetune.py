"""Fine-tune a pretrained torchvision ResNet on all ten digits.

    python -m launcher recipes/resnet_finetune --weights=runs/demo/pretrain
    accelerate launch -m launcher recipes/resnet_finetune --weights=...

The stem and the first stages stay frozen (BatchNorm statistics fixed), the last stage trains
at the base LR and the new 10-class head at `head_lr_scale` times it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torchvision

from launcher import Group, Schedule, TrainConfig, load_weights, warmup_cosine
from recipes.digits import digit_shards


@dataclass
class Config(TrainConfig):
    data_dir: str = "data/digits"  # demo shards (scripts/make_demo_data.py)
    image_size: int = 32  # digits are resized from 8x8 to this many pixels square
    arch: str = "resnet18"  # a torchvision ResNet name
    weights: str = ""  # initial weights: a launcher run's output_dir, a .pth/.pt/.safetensors file, or a torchvision name (IMAGENET1K_V1) from the hub cache; "" = random
    num_classes: int = 10  # the head is replaced to this many classes
    frozen: tuple[str, ...] = ("conv1", "bn1", "layer1", "layer2", "layer3")  # modules kept frozen
    head_lr_scale: float = 10.0  # the head's LR = lr x this
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
    frozen = [pattern for name in cfg.frozen for pattern in (name, f"{name}.*")]
    return Schedule(
        groups=[Group("frozen", frozen, frozen=True),
                Group("head", ["fc.*"], lr_scale=cfg.head_lr_scale),
                Group("backbone", ["*"])],
        lr_at=warmup_cosine(cfg.warmup_steps, cfg.min_lr_ratio))
