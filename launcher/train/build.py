"""Everything a run is made of, before Accelerate wraps it: data loaders, model, loss, metrics, the
pre-flight check, the plan, parameter groups (shared by `plan` and training)."""

from __future__ import annotations

import dataclasses

import torch
from accelerate.utils import set_seed

from launcher.config import ConfigError, TrainConfig
from launcher.data.loader import SplitLoader
from launcher.data.spec import Synthetic
from launcher.optim.groups import ParamGroup, Schedule, apply_freezing, assign_groups
from launcher.recipe import Recipe
from launcher.runtime import checkpoints, meta_build, run_config
from launcher.runtime.parallel import Replicated
from launcher.runtime.sharding import find_units, reshard
from launcher.runtime.weights import load_weights
from launcher.train import adapters
from launcher.train.modeling import init_layer, init_weights, model_summary
from launcher.train.plan import Plan, format_plan, make_plan, parallel_lines, training_lines
from launcher.train.preflight import Checked, preflight, unused_outputs_note


@dataclasses.dataclass
class RunParts:
    cfg: TrainConfig  # with the task's best metric and mode filled in
    train_data: SplitLoader
    val_data: SplitLoader | None
    plan: Plan
    model: torch.nn.Module
    schedule: Schedule
    groups: list[ParamGroup]
    checked: Checked  # step style, task, classes, metrics (launcher/train/preflight.py)
    classes: list[str]
    extra_metrics: dict | None  # the recipe's build_metrics
    units: list[tuple[str, torch.nn.Module]]  # shard (and activation-checkpointing) units, innermost first
    # what an EMA copies: the model, or under FSDP a copy of it as built, without values
    ema_source: torch.nn.Module
    frozen_base: frozenset[str] = frozenset()  # a PEFT model's frozen base: in no group, not checkpointed

    def regroup(self, model: torch.nn.Module) -> list[ParamGroup]:
        """The parameter groups again, over `model`'s parameters now (FSDP replaces them by shards)."""
        groups = assign_groups(
            model,
            self.schedule,
            self.cfg.lr,
            self.cfg.weight_decay,
            self.plan.steps_per_epoch,
            self.frozen_base,
        )
        apply_freezing(groups, step=0)
        return groups


def build_parts(
    cfg: TrainConfig,
    recipe: Recipe,
    rank: int,
    world: int,
    device: torch.device = torch.device("cpu"),
    parallel: Replicated | None = None,
) -> RunParts:
    """Everything a run is made of, before Accelerate wraps it (shared by `plan` and training),
    checked by pushing one real batch of each split through it on `device`. Training passes its
    `parallel`, which is handed the model before the check: under FSDP the check runs sharded."""
    set_seed(cfg.seed)  # the same initial weights on every rank
    data = recipe.build_data(cfg)
    loader_args = dict(
        rank=rank,
        world=world,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        batch_transform=data.batch_transform,
        pin_memory=cfg.pin_memory,
        prefetch_factor=cfg.prefetch_factor,
        persistent_workers=cfg.persistent_workers,
        data_on_gpu=cfg.data_on_gpu,
        collate_fn=data.collate,
        device=device,
    )
    train_data = SplitLoader(
        data.train,
        batch_size=cfg.batch_size,
        training=True,
        grad_accum_steps=cfg.grad_accum_steps,
        train_samples=data.train_samples,
        max_steps=cfg.max_steps,
        **loader_args,
    )
    # --eval_batches leaves each evaluation's loader midway: a persistent one, reused, would wait for
    # the ring buffers of the batches it never handed over (BufferReturns).
    val_args = dict(loader_args, persistent_workers=cfg.persistent_workers and not cfg.eval_batches)
    val_data = (
        SplitLoader(data.val, batch_size=cfg.eval_batch_size, training=False, **val_args)
        if data.val is not None
        else None
    )
    classes = list(data.classes or train_data.classes)
    classes_from = (
        "DataSpec.classes"
        if data.classes
        else "index.json"
        if train_data.index is not None
        else "the dataset's .classes"
    )
    model, units, ema_source = build_model(cfg, recipe, device, parallel)
    frozen = adapters.frozen_base(model)  # a PEFT model's base, named before anything changes requires_grad
    if parallel is not None:
        parallel.frozen_base = frozen
    if cfg.export_merged:
        adapters.check_mergeable(model)
    loss_fn = recipe.build_loss(cfg)
    extra_metrics = recipe.build_metrics(cfg)
    with torch.compiler.set_stance("force_eager"):  # FSDP compiled its units already: the check would compile
        # graphs (no grad, eval mode) that training never runs, doubling --compile's start-up
        checked = preflight(
            cfg, recipe, train_data, val_data, model, device, loss_fn, extra_metrics, classes, classes_from
        )
    reshard(model)  # FSDP: the root's parameters were gathered for the check
    for split in (train_data, val_data):
        if split is not None:
            split.num_classes = checked.label_classes  # labels out of range: unreadable samples
    cfg = dataclasses.replace(cfg, best_metric=checked.best_metric, best_mode=checked.best_mode)
    if cfg.synthetic_data:
        train_data, val_data = (
            _synthetic(split, checked, loader_args) if split else None for split in (train_data, val_data)
        )
    plan = make_plan(cfg, train_data, val_data, world)
    plan.notes.append(unused_outputs_note(cfg, checked, classes, classes_from))
    schedule = recipe.build_schedule(cfg, model).resolved(cfg)
    groups = assign_groups(model, schedule, cfg.lr, cfg.weight_decay, plan.steps_per_epoch, frozen)
    apply_freezing(groups, step=0)
    plan.notes.append(adapters.plan_note(model, frozen))
    if (cfg.mixup_alpha or cfg.cutmix_alpha) and not getattr(loss_fn, "soft_targets", True):
        raise ConfigError(
            f"MixUp/CutMix make soft targets, which --loss={cfg.loss} cannot take; "
            "use --loss=cross_entropy or bce_with_logits"
        )
    plan.training = training_lines(cfg, schedule, loss_fn, checked)
    plan.model = model_summary(model, checked.summary)
    plan.parallel = parallel_lines(cfg, model, groups, schedule.optimizer, world, units)
    return RunParts(
        cfg,
        train_data,
        val_data,
        plan,
        model,
        schedule,
        groups,
        checked,
        classes,
        extra_metrics,
        units,
        ema_source,
        frozen,
    )


def build_model(cfg: TrainConfig, recipe: Recipe, device: torch.device, parallel: Replicated | None):
    """The recipe's model on `device`, handed to `parallel` (None: `plan`, the model alone), its
    shard units, and what an EMA copies. Under FSDP it is built without memory, sharded, then loaded
    (each rank its shards' rows) or initialised (launcher/runtime/meta_build.py); a recipe that loads
    no weights is built on the host as before (the same random draws as DDP), then sharded."""
    if cfg.weight_init != "default" and getattr(cfg, "weights", ""):
        raise ConfigError(
            f"--weight_init={cfg.weight_init} would overwrite the loaded --weights; use one or the other"
        )
    sharded = parallel is not None and parallel.sharded
    if parallel is not None:
        parallel.memory.before_build()
    loads = []
    if sharded:
        with torch.random.fork_rng(devices=[]), meta_build.empty_model() as loads:
            model = recipe.build_model(cfg)
    if not loads or adapters.is_peft_model(model):  # peft's wrapping renames the loaded tensors: built whole
        model = recipe.build_model(cfg)
        if not meta_build.is_empty(model):
            init_weights(model, cfg.weight_init)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not meta_build.is_empty(model):
        model.to(device)
    units = find_units(model, recipe.shard_units(cfg, model), cfg.fsdp_unit_params)
    ema_source = meta_build.meta_copy(model) if sharded and cfg.ema_decay else model
    if parallel is not None:
        parallel.place(model, units)  # FSDP: sharded
    if meta_build.is_empty(model):
        meta_build.materialise(
            model,
            device,
            loads,
            load_weights,
            meta_build.module_init(model, lambda module: init_layer(module, cfg.weight_init)),
        )
    if parallel is not None:
        parallel.memory.after_build()
    return model, units, ema_source


def _synthetic(split: SplitLoader, checked: Checked, loader_args: dict) -> SplitLoader:
    """The split as random batches with the structure of its first real one, with its sizes and
    batch transform."""
    source = Synthetic(checked.example, split.total, split.batch_transform)
    return SplitLoader(
        source,
        batch_size=split.batch_size,
        training=split.training,
        batches_per_epoch=split.batches_per_epoch,
        **{**loader_args, "collate_fn": None},
    )


def print_plan(cfg: TrainConfig, recipe: Recipe, world_size: int) -> None:
    resume_from = checkpoints.find_resume(cfg, log=lambda _: None) if cfg.resume else None
    note = ""
    if resume_from:
        cfg, note = run_config.keep_global_batch(cfg, resume_from, world_size)
    parts = build_parts(cfg, recipe, rank=0, world=world_size)
    parts.plan.notes.append(note)
    print(format_plan(parts.cfg, parts.plan, parts.groups, recipe.name))
