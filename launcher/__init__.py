"""launcher: turn a recipe (model + data + schedule) into a distributed training run on Accelerate."""

from launcher.config import ConfigError, TrainConfig, variant
from launcher.data import DataSpec, Shards
from launcher.params import Group, Schedule, layer_decay, sgd
from launcher.weights import load_weights
from launcher.schedules import constant, warmup_cosine

__all__ = ["ConfigError", "TrainConfig", "variant", "DataSpec", "Shards", "Group", "Schedule", "layer_decay", "sgd",
           "constant", "warmup_cosine", "load_weights"]
