"""Finding and loading a recipe: a Python file with a `Config` and `build_*` functions.

A recipe module defines:
  Config                      a dataclass subclassing launcher.TrainConfig
  build_model(cfg)            -> torch.nn.Module
  build_data(cfg)             -> launcher.DataSpec
  build_schedule(cfg, model)  -> launcher.Schedule   (optional: one group; --optimizer, --lr_schedule)
  build_loss(cfg)             -> callable(outputs, targets)
                                 (optional: --loss, --label_smoothing, --class_weights)
  compute_loss(model, batch[, cfg]) -> loss | (loss_sum, count) | launcher.StepOutput
                                 (optional: the step itself)
  build_metrics(cfg)          -> {name: metric} updated with (outputs, targets): a torchmetrics.Metric, or any
                                 object with update, compute, reset and to(device) (optional)
  predict_sample(cfg, text)   -> a sample, or its inputs alone (predict adds a placeholder target), for
                                 `launcher predict` on inputs that are not images (optional)
  shard_units(cfg, model)     -> the modules (or their names) that become FSDP shard units and
                                 activation-checkpointing units (optional: the repeated blocks)
  allowed_missing(cfg)        -> fnmatch patterns of the trainable parameters that pretrained weights may
                                 leave unloaded (a new head, adapters); any other unloaded one is refused
                                 (optional: none; a recipe's own load_weights call takes allow_missing=)
  hf_model(cfg, model)        -> the transformers model (the model itself or one of its submodules) that
                                 OUTPUT_DIR/hf/ is written from in save_pretrained's layout, or None
                                 (optional: the model itself when it is a transformers PreTrainedModel)
  tokenizer_dir(cfg)          -> a directory whose tokenizer files OUTPUT_DIR/hf/ gets beside the model
                                 (optional: none)
  callbacks(cfg)              -> objects with any of on_train_start, on_step_end, on_evaluate,
                                 on_save, on_train_end (optional: launcher/train/callbacks.py)
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from launcher.config import ConfigError, TrainConfig
from launcher.optim import losses
from launcher.optim.groups import Schedule, default_schedule


@dataclass
class Recipe:
    name: str
    module: ModuleType

    @property
    def config_cls(self) -> type[TrainConfig]:
        return self.module.Config

    def default_config(self) -> TrainConfig:
        return self.config_cls()

    def build_model(self, cfg):
        return self.module.build_model(cfg)

    def build_data(self, cfg):
        return self.module.build_data(cfg)

    def build_schedule(self, cfg, model) -> Schedule:
        build = getattr(self.module, "build_schedule", None)
        return build(cfg, model) if build else default_schedule(cfg)

    def build_loss(self, cfg) -> Callable:
        build = getattr(self.module, "build_loss", None)
        return build(cfg) if build else losses.from_config(cfg)

    def compute_loss(self, cfg) -> Callable | None:
        """The recipe's compute_loss as (model, batch) -> result; one taking a third argument gets cfg."""
        fn = getattr(self.module, "compute_loss", None)
        if fn is None or len(inspect.signature(fn).parameters) < 3:
            return fn
        return lambda model, batch: fn(model, batch, cfg)

    def build_metrics(self, cfg) -> dict | None:
        build = getattr(self.module, "build_metrics", None)
        return dict(build(cfg)) if build else None

    def shard_units(self, cfg, model) -> list | None:
        build = getattr(self.module, "shard_units", None)
        return list(build(cfg, model)) if build else None

    def allowed_missing(self, cfg) -> list[str]:
        build = getattr(self.module, "allowed_missing", None)
        return list(build(cfg)) if build else []

    def hf_model(self, cfg, model):
        """The recipe's hf_model(cfg, model); without one, `model` itself, which is exported when it
        is a transformers model (launcher.runtime.export.hf_layout decides)."""
        choose = getattr(self.module, "hf_model", None)
        return choose(cfg, model) if choose is not None else model

    def tokenizer_dir(self, cfg) -> str:
        build = getattr(self.module, "tokenizer_dir", None)
        return str(build(cfg) or "") if build else ""

    @property
    def source_path(self) -> str | None:
        return getattr(self.module, "__file__", None)


def load_recipe(spec: str) -> Recipe:
    """Load a recipe from a file path (with or without .py) or a dotted module name."""
    tried: list[str] = []
    module = None
    for path in _candidate_paths(spec):
        tried.append(str(path))
        if path.is_file():
            module = _import_file(path)
            break
    if module is None and _looks_dotted(spec):
        tried.append(f"module {spec}")
        module = _import_dotted(spec)
    if module is None:
        raise ConfigError(
            f"unknown recipe {spec!r}: tried {', '.join(tried)}; "
            "pass a recipe file (recipes/NAME or recipes/NAME.py) or a dotted module name"
        )
    _check_recipe(spec, module)
    return Recipe(name=Path(module.__file__ or spec).stem, module=module)


def recipe_named_in(config_file: str, name) -> Recipe:
    """The recipe a config file names: beside a run's config.json, the recipe.py the run saved (the
    source it trained with; `name` is the recipe's); else `name`, a recipe file or module."""
    copy = Path(config_file).with_name("recipe.py")
    if Path(config_file).name == "config.json" and copy.is_file():
        try:
            module = _import_file(copy)
        except ImportError as error:
            raise ConfigError(
                f"{copy}, the recipe the run saved, does not import ({error}); name the recipe: "
                f"python -m launcher RECIPE ..."
            ) from None
        _check_recipe(str(copy), module)
        return Recipe(name=str(name or copy.stem), module=module)
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{config_file} names no recipe; add `recipe: recipes/NAME` to it or pass the RECIPE "
            "before --config"
        )
    return load_recipe(name)


def _candidate_paths(spec: str) -> list[Path]:
    path = Path(spec)
    candidates = [path] if path.suffix == ".py" else [path.with_name(path.name + ".py")]
    if "/" not in spec and not spec.endswith(".py"):
        candidates.append(Path("recipes") / (spec + ".py"))
    return candidates


def _looks_dotted(spec: str) -> bool:
    return all(part.isidentifier() for part in spec.split("."))


def _import_dotted(name: str) -> ModuleType | None:
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except ModuleNotFoundError:
        return None
    return importlib.import_module(name)


def _import_file(path: Path) -> ModuleType:
    """Import a file as part of its package (so `from recipes.base import ...` works in it)."""
    path = path.resolve()
    parts, root = [path.stem], path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    name = ".".join(parts)
    module = importlib.import_module(name)
    if Path(module.__file__).resolve() != path:
        raise ConfigError(
            f"recipe {path} is shadowed by another module named {name} "
            f"({module.__file__}); rename the recipe file"
        )
    return module


def _check_recipe(spec: str, module: ModuleType) -> None:
    missing = [n for n in ("Config", "build_model", "build_data") if not hasattr(module, n)]
    if missing:
        raise ConfigError(
            f"recipe {spec!r} lacks {', '.join(missing)}; a recipe defines Config, "
            "build_model(cfg) and build_data(cfg)"
        )
    if not (isinstance(module.Config, type) and issubclass(module.Config, TrainConfig)):
        raise ConfigError(f"recipe {spec!r}: Config must subclass launcher.TrainConfig")
