"""torchvision's AlexNet trained from scratch on an ImageFolder directory (ROOT/{train,val}/CLASS/IMAGE)
with the standard presets: RandomResizedCrop (+ flip, colour jitter, rotation) for training,
Resize + CenterCrop for evaluation, Normalize with the statistics below; AdamW with warm-up and
cosine decay, label smoothing.

    python -m launcher recipes/alexnet_folder --data_dir=path/to/flowers --image_size=224 --mean=[...]

The default data is the demo's digits written as PNG folders (`make demo`, data/digits/folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torchvision
from torch import nn

from launcher import ConfigError, DataSpec, TrainConfig
from launcher.data import image_folder
from launcher.presets import eval_transform, normalize, train_transform


@dataclass
class Config(TrainConfig):
    data_dir: str = "data/digits/folder"  # ImageFolder root with train/ and val/ inside
    image_size: int = 64  # crop size; AlexNet needs at least 63 pixels
    resize_size: int = 0  # evaluation: resize to this, then centre-crop image_size (0: image_size / 0.875)
    crop_scale: tuple[float, ...] = (0.35, 1.0)  # RandomResizedCrop area range
    #: horizontal flip probability (digits are not mirror-symmetric; 0.5 for natural images)
    hflip: float = 0.0
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter strength (0: off)
    rotation: float = 10.0  # random rotation, degrees (0: off)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # Normalize mean per channel (ImageNet: 0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)  # Normalize std per channel (ImageNet: 0.229, 0.224, 0.225)
    num_classes: int = 10  # classes (sub-directories) in the folder
    dropout: float = 0.5  # AlexNet classifier dropout
    classifier_width: int = 4096  # units of the classifier's two hidden layers (torchvision's AlexNet: 4096)
    output_dir: str = "runs/alexnet_folder"
    epochs: int = 8
    batch_size: int = 64
    #: AdamW (the default optimizer); AlexNet from scratch stalls at chance with SGD at 0.01 here
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    label_smoothing: float = 0.1
    max_grad_norm: float = 2.0


def build_model(cfg: Config):
    if cfg.classifier_width < 1:
        raise ConfigError(f"--classifier_width must be >= 1, got {cfg.classifier_width}")
    model = torchvision.models.alexnet(weights=None, num_classes=cfg.num_classes, dropout=cfg.dropout)
    hidden = model.classifier[1]  # the first of the classifier's two hidden layers
    if cfg.classifier_width != hidden.out_features:  # the same layers, narrower or wider
        width, features = cfg.classifier_width, hidden.in_features
        model.classifier = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(features, width),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(width, width),
            nn.ReLU(inplace=True),
            nn.Linear(width, cfg.num_classes),
        )
    return model


def build_data(cfg: Config):
    train = image_folder(
        os.path.join(cfg.data_dir, "train"),
        train_transform(
            cfg.image_size,
            scale=cfg.crop_scale,
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter,
            rotation=cfg.rotation,
        ),
    )
    val = image_folder(os.path.join(cfg.data_dir, "val"), eval_transform(cfg.image_size, cfg.resize_size))
    if len(train.classes) != cfg.num_classes or val.classes != train.classes:
        raise ConfigError(
            f"{cfg.data_dir}: train has {len(train.classes)} classes, val {len(val.classes)}, the model "
            f"{cfg.num_classes}; set --num_classes and give train/ and val/ the same class folders"
        )
    return DataSpec(train=train, val=val, classes=train.classes, batch_transform=normalize(cfg.mean, cfg.std))
