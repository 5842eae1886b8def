"""Processes and devices: the Accelerator (DDP over GPUs, or gloo over CPU processes), rebuilding
DDP after an unfreeze, and checking that every rank holds the same parameters."""

from __future__ import annotations

import datetime
import functools
import hashlib
import os

import accelerate.optimizer
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

from launcher.config import ConfigError, TrainConfig
from launcher.runtime.sharding import check_fsdp
from launcher.track.trackers import check_trackers, tracker_names, tracker_project

if dist.is_available():
    # Before any process group exists. torch.distributed.nn.functional binds `group.WORLD` as the
    # default argument of its collectives when it is imported; DDP imports it (through
    # torch._dynamo) after the group is made, and the default group is then held for the life of
    # the process: destroy_process_group leaves gloo's worker threads running into interpreter
    # shutdown, where a thread that takes the GIL aborts the rank after a complete run ("terminate
    # called without an active exception", exit -6; pytorch#179291). Imported first, the default
    # is None and destroy_process_group frees the group and its threads
    # (docs/known-problems.md#a-rank-aborts-at-exit).
    import torch.distributed.nn.functional  # noqa: F401


def has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu and xpu.is_available()) or torch.backends.mps.is_available()


def configure_backends(cfg: TrainConfig) -> None:
    """--deterministic: deterministic algorithms everywhere (an op without one raises), cuDNN's
    deterministic kernels without autotuning, and the cuBLAS workspace setting CUDA asks for;
    --cudnn_benchmark: cuDNN autotunes per input shape."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Only when it changes anything: the call imports torch._inductor, seconds of start-up.
    if cfg.deterministic != torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(cfg.deterministic)
    torch.backends.cudnn.deterministic = cfg.deterministic
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    check_trackers(cfg)
    configure_backends(cfg)
    on_cpu = not has_accelerator()
    if on_cpu and cfg.mixed_precision == "fp16":
        raise ConfigError("--mixed_precision=fp16 needs a GPU; use --mixed_precision=bf16 on CPU")
    init_restarted_process_group()
    accelerator = Accelerator(
        cpu=on_cpu,  # DDP with gloo over CPU processes when no GPU is present
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=tracker_names(cfg) or None,  # wandb and/or tensorboard (launcher.track.trackers)
        project_config=tracker_project(cfg),  # output_dir; TensorBoard writes under OUTPUT_DIR/tensorboard
        kwargs_handlers=ddp_kwargs(cfg),
    )
    check_fsdp(cfg, accelerator.device)
    if on_cpu and accelerator.num_processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        # N CPU processes on one machine must share its cores, not each take all of them.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return accelerator


def init_restarted_process_group() -> None:
    """After a restart by torchrun (`--max_restarts`, also through `accelerate launch`), the process
    group in a namespace of the store of its own. torchrun's static rendezvous (the default, and
    accelerate launch's) keeps one TCP store for all its attempts, while torch's env:// init takes
    it that each attempt gets a new one: the ranks of a restart then read the addresses that the
    previous attempt's ranks published under the same keys, and gloo's connectFullMesh (NCCL's
    bootstrap likewise) connects to ports nobody listens on ("Connection refused") or waits on a
    barrier count that has already passed. Accelerate uses a group that is already initialised.
    The first attempt (TORCHELASTIC_RESTART_COUNT 0) is left to Accelerate."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo" if not has_accelerator() else None
    if backend is None:
        return  # another accelerator's backend: Accelerate's own start-up
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=datetime.timedelta(minutes=30),
    )
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"launcher/attempt-{attempt}", store), rank=rank, world_size=world
    )


def ddp_kwargs(cfg: TrainConfig) -> list:
    """Accelerate's DDP settings: --ddp_comm_hook registers torch's fp16/bf16 compression hook."""
    if cfg.ddp_comm_hook == "no":
        return []
    return [DistributedDataParallelKwargs(comm_hook=DDPCommunicationHookType(cfg.ddp_comm_hook))]


# AcceleratedOptimizer.step asks is_lomo_available() (an importlib lookup, ~0.3 ms on a CPU) on
# every optimizer step; the answer cannot change within a process, so ask once.
if hasattr(accelerate.optimizer, "is_lomo_available"):
    accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


class ReplicaChecksums:
    """A short hash of each rank's parameters, from every rank: what `replicas.json` records."""

    def __init__(self, device: torch.device, world_size: int):
        # Held for the life of this object (docs/known-problems.md#the-gil-at-shutdown).
        self.world_size = world_size
        self.mine = torch.zeros(8, dtype=torch.int64, device=device)
        self.everyone = [torch.zeros_like(self.mine) for _ in range(world_size)]

    def __call__(self, model: torch.nn.Module) -> list[str]:
        """A collective: every rank calls it with its (unwrapped) model."""
        digest = hashlib.sha256()
        for tensor in replica_tensors(model):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.mine.copy_(torch.tensor(list(digest.digest()[:8]), dtype=torch.int64))
        if self.world_size > 1:
            dist.all_gather(self.everyone, self.mine)
        else:
            self.everyone[0].copy_(self.mine)
        return [bytes(row.tolist()).hex() for row in self.everyone]


def rewrap_ddp(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """DDP all-reduces only the parameters that required grad when it was built: after an unfreeze,
    build it again as Accelerate does (its kwargs and comm hook), and put it where Accelerate's
    checkpoints look for the model. A collective: every rank calls it at the same step."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model
    handler = accelerator.ddp_handler
    wrapped = torch.nn.parallel.DistributedDataParallel(
        model.module,
        device_ids=model.device_ids,
        output_device=model.output_device,
        **(handler.to_kwargs() if handler else {}),
    )
    if handler:
        handler.register_comm_hook(wrapped)
    models = accelerator._models  # no public API swaps a prepared model; on CPU it holds the bare module
    for i, held in enumerate(models):
        if held is model:
            models[i] = wrapped
    return wrapped


def replica_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters in a fixed order: what DDP keeps identical on every rank. (Buffers such as
    BatchNorm running statistics are rank-local after the last forward, by DDP's design.)"""
    return [p for _, p in sorted(model.named_parameters())]
