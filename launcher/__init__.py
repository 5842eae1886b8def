"""launcher: turn a recipe (model + data + schedule) into a distributed training run on Accelerate."""

from launcher.config import ConfigError, TrainConfig
from launcher.data.decoders import fields, image_label
from launcher.data.spec import DataSpec, Shards
from launcher.optim.groups import Group, Schedule, layer_decay
from launcher.optim.losses import loss
from launcher.optim.optimizers import optimizer, sgd
from launcher.optim.schedules import (
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    MultiStepLR,
    Plateau,
    StepLR,
    constant,
    warmup,
    warmup_cosine,
)
from launcher.overrides import variant
from launcher.runtime.weights import load_weights
from launcher.track.media import Images, Table
from launcher.train.step import StepOutput

__all__ = [
    "ConfigError",
    "TrainConfig",
    "variant",
    "DataSpec",
    "Shards",
    "fields",
    "image_label",
    "StepOutput",
    "Group",
    "Schedule",
    "layer_decay",
    "sgd",
    "optimizer",
    "loss",
    "constant",
    "warmup_cosine",
    "warmup",
    "StepLR",
    "MultiStepLR",
    "ExponentialLR",
    "CosineAnnealingLR",
    "LambdaLR",
    "Plateau",
    "load_weights",
    "Table",
    "Images",
]
