"""An MLP regression on scikit-learn's diabetes data (real data shipped with scikit-learn, no network).

    python -m launcher recipes/regression
    python -m launcher predict recipes/regression --checkpoint=runs/regression \\
        59,2,32.1,101,157,93.2,38,4,4.86,87

442 patients, 10 raw features (age, sex, bmi, blood pressure, six serum measurements) and a
disease-progression score a year later. A fixed, seeded split keeps `val_fraction` of them for
validation; features and target are standardised with the training split's mean and standard
deviation only, so val/mse is in units of the target's variance (1.0 = predicting the mean) and a
prediction reads as score = target_mean + target_std x output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from launcher import ConfigError, DataSpec, TrainConfig

NUM_FEATURES = 10  # load_diabetes(): age, sex, bmi, bp, s1..s6


@dataclass
class Config(TrainConfig):
    hidden: int = 64  # units in each of the two hidden layers
    dropout: float = 0.1  # after each hidden layer
    val_fraction: float = 0.2  # share of the 442 patients held out for validation
    #: seed of the train/val split (fixed apart from --seed, so runs compare on the same split)
    split_seed: int = 0
    loss: str = "mse"  # training loss (mse or l1 for regression)
    output_dir: str = "runs/regression"
    epochs: int = 60
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-2


@functools.lru_cache(maxsize=4)
def diabetes_split(val_fraction: float, split_seed: int) -> dict[str, torch.Tensor]:
    """Standardised train/val tensors and the training statistics that standardised them."""
    from sklearn.datasets import load_diabetes

    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    raw = load_diabetes(scaled=False)
    features = torch.tensor(raw.data, dtype=torch.float32)
    target = torch.tensor(raw.target, dtype=torch.float32)
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(split_seed))
    cut = int(round(len(target) * val_fraction))
    val, train = order[:cut], order[cut:]
    stats = {
        "feature_mean": features[train].mean(0),
        "feature_std": features[train].std(0),
        "target_mean": target[train].mean(),
        "target_std": target[train].std(),
    }
    x = (features - stats["feature_mean"]) / stats["feature_std"]
    y = (target - stats["target_mean"]) / stats["target_std"]
    return {"train_x": x[train], "train_y": y[train], "val_x": x[val], "val_y": y[val], **stats}


def build_model(cfg: Config) -> nn.Module:
    h = cfg.hidden
    return nn.Sequential(
        nn.Linear(NUM_FEATURES, h),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(h, h),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(h, 1),
        nn.Flatten(0),
    )  # (N, 1) -> (N,), the shape of the targets


def build_data(cfg: Config) -> DataSpec:
    split = diabetes_split(cfg.val_fraction, cfg.split_seed)
    # Samples are (features (10,) float32, target () float32): the pair step style.
    return DataSpec(
        train=TensorDataset(split["train_x"], split["train_y"]),
        val=TensorDataset(split["val_x"], split["val_y"]),
    )


def predict_sample(cfg: Config, text: str) -> torch.Tensor:
    """'59,2,32.1,...': ten raw feature values, in load_diabetes() order -> the standardised features
    (the launcher adds a placeholder target)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"expected {NUM_FEATURES} comma-separated numbers, got {text!r}") from None
    if len(values) != NUM_FEATURES:
        raise ConfigError(
            f"expected {NUM_FEATURES} comma-separated feature values "
            f"(age, sex, bmi, bp, s1..s6), got {len(values)}"
        )
    split = diabetes_split(cfg.val_fraction, cfg.split_seed)
    features = (torch.tensor(values) - split["feature_mean"]) / split["feature_std"]
    return features
