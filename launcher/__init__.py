"""launcher: turn a recipe (model + data + schedule) into a distributed training run on Accelerate."""

from launcher.config import ConfigError, TrainConfig, variant
from launcher.data import DataSpec, Shards
from launcher.decoders import fields, image_label
from launcher.losses import loss
from launcher.optimizers import optimizer, sgd
from launcher.params import Group, Schedule, layer_decay
from launcher.weights import load_weights
from launcher.step import StepOutput
from launcher.schedules import (CosineAnnealingLR, ExponentialLR, LambdaLR, MultiStepLR, Plateau, StepLR, constant,
                                warmup, warmup_cosine)

__all__ = ["ConfigError", "TrainConfig", "variant", "DataSpec", "Shards", "fields", "image_label", "StepOutput",
           "Group", "Schedule", "layer_decay", "sgd", "optimizer", "loss", "constant", "warmup_cosine", "warmup", "StepLR", "MultiStepLR", "ExponentialLR",
           "CosineAnnealingLR", "LambdaLR", "Plateau", "load_weights"]
