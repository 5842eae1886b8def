"""The plan of a run: batch arithmetic, steps, parameter groups and outputs, before any training;
and, at its end, where everything went.

`python -m launcher plan RECIPE` prints the plan; training prints it too, from the main process.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import statistics
import sys
from dataclasses import dataclass, field

from launcher.config import ConfigError, TrainConfig
from launcher.data.batch import describe as describe_batch
from launcher.data.batch_crops import output_side, shrink_target
from launcher.data.iterable import is_iterable
from launcher.data.loader import SplitLoader
from launcher.data.remote import is_remote
from launcher.data.spec import Synthetic
from launcher.global_batch import GlobalBatch
from launcher.optim.groups import ParamGroup
from launcher.runtime import checkpoints
from launcher.runtime.parallel import memory_per_rank, optimizer_slots
from launcher.runtime.sharding import describe_units
from launcher.train.metrics import is_accuracy


@dataclass
class Plan:
    batch: GlobalBatch  # per device x processes x accumulation
    train_samples: int
    val_samples: int
    steps_per_epoch: int  # optimizer steps
    epochs: int
    schedule_steps: int  # optimizer steps of the whole run: what the LR schedule spans
    total_steps: int  # optimizer steps this process will run (max_steps stops early)
    train_shards: int | None
    val_shards: int | None
    data_report: list[str] = field(default_factory=list)  # pre-flight lines about the shards
    notes: list[str] = field(default_factory=list)  # changes made to the config, e.g. on resume
    # optimizer, schedule, loss, regularisation, determinism
    training: list[str] = field(default_factory=list)
    model: list[str] = field(default_factory=list)  # the model summary
    parallel: list[str] = field(default_factory=list)  # DDP or FSDP: shard units, memory per rank

    @property
    def global_batch(self) -> int:
        return self.batch.samples

    @property
    def micro_batches_per_epoch(self) -> int:  # per rank
        return self.batch.micro_batches_in_steps(self.steps_per_epoch)


def make_plan(cfg: TrainConfig, train: SplitLoader, val: SplitLoader | None, world_size: int) -> Plan:
    batch = GlobalBatch.of(cfg, world_size)
    # the loader's whole optimizer steps
    steps_per_epoch = batch.steps_in_micro_batches(train.batches_per_epoch)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training split has {train.total} samples, fewer than one optimizer step takes "
            f"({batch}); lower --batch_size or --grad_accum_steps"
        )
    schedule_steps = steps_per_epoch * cfg.epochs
    total = min(schedule_steps, cfg.max_steps) if cfg.max_steps else schedule_steps
    report = data_report(train, "training") + (data_report(val, "validation") if val else [])
    return Plan(
        batch=batch,
        train_samples=train.total,
        val_samples=val.total if val else 0,
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.epochs,
        schedule_steps=schedule_steps,
        total_steps=total,
        train_shards=len(train.index.urls) if train.index else None,
        val_shards=len(val.index.urls) if val and val.index else None,
        data_report=report,
        notes=[fork_hang_warning(sys.version_info, world_size, cfg.num_workers)],
    )


def fork_hang_warning(version: tuple, world_size: int, num_workers: int) -> str:
    """A warning for a multi-process run with DataLoader workers on a CPython that can hang a worker
    as it is forked: the collective threads (gloo's, NCCL's) take the interpreter's thread-state lock
    when they touch Python objects, and before 3.12, 3.11.10 and 3.10.15 a fork at that moment
    copies the lock held into the child, which then never starts (CPython gh-112275). Empty if not."""
    minor, fixed_in = tuple(version[:2]), {(3, 10): 15, (3, 11): 10}
    if world_size < 2 or num_workers == 0 or minor >= (3, 12) or version[2] >= fixed_in.get(minor, 0):
        return ""
    return (
        f"WARNING: Python {'.'.join(map(str, version[:3]))} can hang a DataLoader worker as it starts in a "
        "multi-process run (CPython bug gh-112275, fixed in 3.10.15, 3.11.10 and 3.12): use a newer "
        "Python, or --num_workers=0"
    )


def data_report(split: SplitLoader, name: str) -> list[str]:
    """Pre-flight facts about a split's shards: how they divide among ranks x workers."""
    if isinstance(split.source, Synthetic):
        example = describe_batch(split.source.example)
        return [f"  {name + ' data':<22}synthetic: {split.total} random samples like {example}, no I/O"]
    if is_iterable(split.source):
        what = f"{split.total} samples per epoch" if split.total else "read to its end"
        return [
            f"  {name + ' data':<22}{what} ({type(split.source).__name__}, split over {split.world} "
            f"process(es) x {split.workers_per_rank} worker(s))"
        ]
    if split.index is None:
        return [
            f"  {name + ' data':<22}{split.total} samples (map-style dataset, split by DistributedSampler)"
        ]
    index, world, workers = split.index, split.world, split.workers_per_rank
    counts = index.counts
    local = sum(not is_remote(u) for u in index.urls)
    layout = split.layout(0)
    lines = [
        f"  {name + ' shards':<22}{len(counts)} for {world} process(es) x {workers} worker(s); "
        f"{local} local file(s) checked"
        + (f", {len(counts) - local} remote not checked" if local < len(counts) else ""),
        f"  {'shard sizes':<22}min {min(counts)}, median {statistics.median(counts):g}, max {max(counts)} "
        f"samples (largest / mean {max(counts) / (sum(counts) / len(counts)):.2f})",
    ]
    lines += large_images_warning(index, output_side(split.source.transform), name)
    idle = layout.idle_workers()
    if idle:
        lines.append(
            f"  {'':<22}WARNING: {idle} of {world * workers} workers get no shard each epoch; "
            f"write at least {world * workers} shards to use them all (`launcher shards "
            f"--num_shards={world * workers}`), or lower --num_workers"
        )
    shares = layout.rank_samples()
    if split.training:
        uneven = layout.dropped > 0.02 * split.total and len(counts) % (world * workers)
        lines.append(
            f"  {'per-rank samples':<22}{min(shares)} to {max(shares)} (epoch 0); each rank takes "
            f"{split.batches_per_epoch} batches of {split.batch_size}: {layout.dropped} dropped, "
            f"{layout.repeated} repeated to even them out"
            + (
                f"; shards of even sizes in a multiple of {world * workers} drop less "
                f"(`launcher shards --num_shards={world * workers}`)"
                if uneven
                else ""
            )
        )
        lines += single_class_warning(index, name)
    else:
        lines.append(f"  {'per-rank samples':<22}{min(shares)} to {max(shares)}; each evaluated once")
    return lines


LARGE_IMAGES = 2.0  # warn when the images' median shorter side is over this many times the output side


def large_images_warning(index, side: int, name: str) -> list[str]:
    """A warning when the shards' images (index.json's image sides) are much larger than the `side`
    px the transforms output: each epoch decodes every pixel of them again, to keep a few."""
    if not side or not index.image_sides:
        return []
    short = statistics.median(s["short"] for s in index.image_sides)  # the median of the shards' medians
    if short <= LARGE_IMAGES * side:
        return []
    long = statistics.median(s["long"] for s in index.image_sides)
    return [
        f"  {'':<22}WARNING: the {name} images (median {long:g} x {short:g} px) are over "
        f"{LARGE_IMAGES:g}x the {side} px the transforms output, and every epoch decodes them whole; "
        f"write them smaller once (`launcher shards SOURCE OUT --max_side={shrink_target(side)}`)"
    ]


def single_class_warning(index, name: str) -> list[str]:
    """A warning when most shards hold mostly one class, or a few (index.json's class counts), as
    shards written in class order do: each worker reads whole shards, so its batches would hold
    few classes. A shard counts when its majority class is over 90 % of it (unless one class is
    90 % of the split), or, holding 4+ samples per class, when over half its samples would have to
    change class for it to match the split's class shares (total variation distance over 0.5)."""
    counts = [c for c in index.class_counts or [] if sum(c)]
    totals = [sum(column) for column in zip(*counts)]
    present = sum(t > 0 for t in totals)
    if present < 2:
        return []
    shares = [t / sum(totals) for t in totals]

    def apart(c: list[int]) -> float:
        return 0.5 * sum(abs(n / sum(c) - share) for n, share in zip(c, shares))

    skewed = sum(
        (max(c) > 0.9 * sum(c) and max(shares) < 0.9) or (sum(c) >= 4 * present and apart(c) > 0.5)
        for c in counts
    )
    if skewed <= len(counts) / 2:
        return []
    return [
        f"  {'':<22}WARNING: {skewed} of {len(counts)} {name} shards hold mostly one class or a few "
        "(written in class order?): each worker's batches will hold few classes; rewrite them shuffled "
        "(`launcher shards` shuffles by default) or raise Shards(shuffle_buffer=...)"
    ]


def format_config(cfg: TrainConfig) -> str:
    values = dataclasses.asdict(cfg)
    width = max(map(len, values))
    return "\n".join(f"  {name:<{width}}  {value!r}" for name, value in values.items())


def format_plan(cfg: TrainConfig, plan: Plan, groups: list[ParamGroup], recipe_name: str) -> str:
    dropped = plan.train_samples - plan.batch.samples_in_steps(plan.steps_per_epoch)
    lines = [
        f"recipe {recipe_name}",
        "config:",
        format_config(cfg),
        "plan:",
        f"  world size            {plan.batch.world_size} process(es)",
        f"  batch                 {plan.batch} global",
        f"  training samples      {plan.train_samples}"
        + (f" in {plan.train_shards} shards" if plan.train_shards else f" ({dropped} left over per epoch)"),
        f"  validation samples    {plan.val_samples}"
        + (f" in {plan.val_shards} shards" if plan.val_shards else ""),
        *(f"  {'note':<22}{note}" for note in plan.notes if note),
        f"  optimizer steps       {plan.steps_per_epoch} per epoch x {plan.epochs} epochs"
        + f" -> {plan.schedule_steps} total"
        + (f" (stops after {plan.total_steps}: max_steps)" if plan.total_steps < plan.schedule_steps else ""),
        *plan.data_report,
        "  evaluation            "
        + (f"every {cfg.eval_every} optimizer steps" if cfg.eval_every else "at each epoch end")
        + (
            f", on the first {cfg.eval_batches} batches of each process"
            if cfg.eval_batches
            else ", every sample"
        ),
        f"  mixed precision       {cfg.mixed_precision}",
        *plan.parallel,
        f"  outputs               {cfg.output_dir} (metrics.jsonl, config.json, recipe.py, "
        "checkpoints/, model.safetensors)",
        f"  wandb                 {cfg.wandb_mode}, project {cfg.wandb_project}",
        *plan.training,
        "model:",
        *plan.model,
        "parameter groups:",
        format_groups(groups),
    ]
    return "\n".join(lines)


def parallel_lines(
    cfg: TrainConfig, model, groups: list[ParamGroup], optimizer_factory, world: int, units: list
) -> list[str]:
    """The data-parallel mode, its shard units, and the bytes each process holds under DDP and FSDP."""
    trained = [p for pg in groups if pg.in_optimizer for p in pg.params]
    slots = optimizer_slots(optimizer_factory)
    ddp, fsdp = (memory_per_rank(model, trained, slots, world, sharded) for sharded in (False, True))

    def mb(memory: dict) -> str:
        return ", ".join(f"{name} {memory[name] / 2**20:.1f} MB" for name in ("params", "grads", "optimizer"))

    modes = [("ddp", ddp), (f"fsdp over {world} process(es)", fsdp)]
    if cfg.data_parallel == "fsdp":
        modes.reverse()
    units = f", shard units {describe_units(units)}" if cfg.data_parallel == "fsdp" else ""
    lines = [
        f"  data parallel         {cfg.data_parallel}{units}",
        "  memory per process    " + "; ".join(f"{name}: {mb(memory)}" for name, memory in modes),
    ]
    if cfg.data_parallel == "fsdp":
        whole = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        lines.append(
            f"  building the model    {whole:.1f} MB of parameters whole before sharding, "
            f"{fsdp['params'] / 2**20:.1f} MB per process after; loading --weights, each process "
            "builds it on the meta device and holds only its shards (launcher/runtime/meta_build.py)"
        )
    return lines


def format_groups(groups: list[ParamGroup]) -> str:
    rows = [("name", "params", "lr", "weight_decay", "trains")]
    for pg in groups:
        rows.append(
            (
                pg.name,
                f"{pg.num_params:,}",
                f"{pg.lr:.3g}" if pg.in_optimizer else "-",
                f"{pg.weight_decay:.3g}" if pg.in_optimizer else "-",
                _when(pg),
            )
        )
    now = sum(pg.num_params for pg in groups if pg.trains_at(0))
    later = sum(pg.num_params for pg in groups if pg.in_optimizer) - now
    total = sum(pg.num_params for pg in groups)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append(
        f"  {now:,} of {total:,} parameters trainable"
        + (f", {later:,} more after unfreezing" if later else "")
    )
    return "\n".join(lines)


def _when(pg: ParamGroup) -> str:
    if pg.starts_at is None:
        return "never (frozen)"
    if pg.starts_at == 0:
        return "always"
    group = pg.group
    epoch = f" (epoch {group.unfreeze_epoch})" if group.unfreeze_epoch is not None else ""
    warmup = f", LR warm-up {group.unfreeze_warmup_steps} steps" if group.unfreeze_warmup_steps else ""
    return f"from step {pg.starts_at}{epoch}{warmup}"


def training_lines(cfg: TrainConfig, schedule, loss_fn, checked) -> list[str]:
    """How the run trains: optimizer, LR schedule, step and loss, task metrics, regularisation, determinism.
    `checked` is the pre-flight's finding (launcher/train/preflight.py)."""
    style = {
        "pair": f"(inputs, targets) pairs, loss {describe(loss_fn)}",
        "model_loss": "model(**batch) returns its own loss",
        "compute_loss": "the recipe's compute_loss(model, batch)",
    }[checked.step.style]
    if checked.counted:
        style += ", a sum normalised by the count over each optimizer step and all ranks"
    classes = f", {checked.num_classes} classes" if checked.task == "classification" else ""
    lines = [
        f"  {'optimizer':<22}{describe(schedule.optimizer)}",
        f"  {'LR schedule':<22}{describe(schedule.lr_at)}",
        f"  {'step':<22}{style}",
        f"  {'task':<22}{checked.task}{classes}: {', '.join(checked.metric_names)}; best "
        f"{cfg.best_metric} ({cfg.best_mode})",
    ]
    extras = [
        f"EMA decay {cfg.ema_decay} (evaluated as val_ema/*)" if cfg.ema_decay else "",
        f"MixUp alpha {cfg.mixup_alpha}" if cfg.mixup_alpha else "",
        f"CutMix alpha {cfg.cutmix_alpha}" if cfg.cutmix_alpha else "",
        f"early stop after {cfg.early_stop_patience} evaluations without a better {cfg.best_metric}"
        + (f" (by more than {cfg.early_stop_min_delta:g})" if cfg.early_stop_min_delta else "")
        if cfg.early_stop_patience
        else "",
    ]
    lines.append(f"  {'regularisation':<22}{'; '.join(e for e in extras if e) or 'none beyond weight decay'}")
    if cfg.deterministic:
        lines.append(
            f"  {'determinism':<22}deterministic algorithms: cuDNN autotuning off and deterministic kernels "
            "only (slower GPU convolutions), cuBLAS workspace :4096:8 (a little more GPU memory); an op "
            "without a deterministic version raises"
        )
    elif cfg.cudnn_benchmark:
        lines.append(
            f"  {'determinism':<22}cuDNN benchmark on: fastest kernels per shape, not bitwise reproducible"
        )
    return lines


def done_lines(
    cfg: TrainConfig,
    summary: dict,
    best: dict | None,
    ema: bool,
    wandb_dir: str | None,
    tensorboard_dir: str | None,
) -> str:
    """What training prints at its end: the steps, the best evaluation, and where everything went."""
    out = cfg.output_dir
    lines = [f"done: {summary['steps']} optimizer steps"]
    if best:
        value = best["value"]
        shown = f"{100 * value:.2f} %" if is_accuracy(best["metric"]) else f"{value:.4g}"
        lines.append(
            f"  best {best['metric']:<10} {shown} (step {best['step']}; "
            f"{os.path.join(out, 'checkpoints', checkpoints.BEST_FILE)})"
        )
    lines += [
        f"  metrics         {os.path.join(out, 'metrics.jsonl')}",
        f"  weights         {summary.get('weights_file', os.path.join(out, 'model.safetensors'))}"
        + (
            f" (step {summary['final_weights_step']}, the best)"
            if summary.get("final_weights") == "best"
            else ""
        ),
    ]
    if summary.get("hf_dir"):
        lines.append(f"  transformers    {summary['hf_dir']} (from_pretrained loads it)")
    if ema:
        lines.append(
            f"  EMA weights     {summary.get('ema_weights_file', os.path.join(out, 'model_ema.safetensors'))}"
        )
    if wandb_dir:
        lines.append(f"  wandb run       {wandb_dir} ({cfg.wandb_mode}; `wandb sync {wandb_dir}` uploads it)")
    if tensorboard_dir:
        lines.append(f"  tensorboard     {tensorboard_dir} (`tensorboard --logdir {tensorboard_dir}`)")
    return "\n".join(lines)


def describe(thing) -> str:
    """A readable name for an optimizer factory, a schedule or a loss."""
    if isinstance(thing, functools.partial):
        args = ", ".join(f"{k}={v!r}" for k, v in thing.keywords.items())
        return f"{describe(thing.func)}({args})"
    if isinstance(thing, type) or inspect.isfunction(thing):
        name = thing.__qualname__
        return name.split(".<locals>")[0] if "<locals>" in name else name
    return repr(thing)
