"""Small helpers that several modules share and that have no domain of their own: seeding and the random
generators' states (per-process streams under torchrun, what last.pt saves and a resumed run restores), the device,
mixed precision and loader workers a run uses, the EMA of the weights, and short listings for messages."""
from __future__ import annotations

import functools
import os
import random
import signal
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

import distributed
from errors import UserError

if TYPE_CHECKING:
    from config import Config


# ---------------------------------------------------------------- seeding and random generators

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too; loader workers derive their seeds from the torch generator


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    # Ctrl-C and SIGTERM reach the whole process group: the main process stops the run cleanly and shuts the
    # workers down itself, which it could not do if they had died mid-batch
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def seed_rank_streams(seed: int, salt: int = 0) -> None:
    """Give each torchrun process a random stream of its own for the work drawn in the training loop (dropout,
    random erasing, the device-side colour draws, the mixing coin): with one shared stream, image j of every
    process's batch would get the same jitter, box and mask. The model is built before this, from --seed alone, so
    every process starts from the same weights. Rank 0 keeps the stream of --seed: one process trains as before."""
    rank = distributed.rank()
    if rank == 0:
        return
    derived = int(np.random.SeedSequence([seed, rank, salt]).generate_state(1, np.uint64)[0] >> 1)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)  # seeds CUDA too


def rank_rng_states() -> list[dict[str, Any]] | None:
    """Every process's rng_state(), in rank order (called by all processes together), or None in a single one."""
    return distributed.gather(rng_state()) if distributed.active() else None


def restore_rng(ckpt: dict[str, Any]) -> None:
    """Set this process's generators to where the saved run left them. Resumed with another number of processes
    (or from a checkpoint without per-process states) the other ranks draw fresh streams of their own, since the old
    ones no longer map onto the new processes."""
    ranks = ckpt.get("rng_ranks")
    if ranks and len(ranks) == distributed.world_size():
        set_rng_state(ranks[distributed.rank()])
        return
    set_rng_state(ckpt["rng"])
    seed_rank_streams(ckpt["config"].get("seed", 0), salt=1 + ckpt["progress"].get("done", 0))


def rng_state() -> dict[str, Any]:
    """Every global generator, as plain types and tensors (weights_only loading accepts them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Draw from torch's generator seeded with `seed`, leaving the global stream as it was (None: no change): an
    image's augmentation, or a preview inside a training run, without moving the run's own draws."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


# ---------------------------------------------------------------- device, precision, loader workers

def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(requested: int, device: torch.device | None = None) -> int:
    """--workers -1 for work on the CPU (device None or cpu): no worker process on a machine with 2 cores or fewer,
    where a worker takes the core the training step needs (measured: --workers 0 trains as fast as 1 or faster on 2
    cores), else one per core but the main process's, at most 16. On a GPU the step leaves the cores free to decode
    and augment while it computes (a 2-core notebook with a T4 would otherwise feed the GPU from its main process
    alone): one worker per core, shared among the GPU processes of this machine (torchrun's LOCAL_WORLD_SIZE), at
    least one each, at most 16."""
    if requested >= 0:
        return requested
    cores = usable_cores()
    if device is not None and device.type == "cuda":
        return max(1, min(16, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    return 0 if cores <= 2 else min(16, cores - 1)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU as Linux lists them (x86 "flags", Arm "Features"); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpu_flags(f.read())
    except OSError:
        return frozenset()


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: x86 AVX512-BF16 or AMX-BF16, Arm's BF16 extension. Without them
    bf16 autocast on the CPU is emulated (each op converts around float32 kernels) and runs far slower than
    float32 (12x to 30x slower measured on an AVX2 CPU), so --amp auto keeps float32 there."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


NATIVE_CUDA_BF16 = (8, 0)  # Ampere and later compute bf16 in hardware; T4, V100 and RTX 20xx only emulate it


def native_cuda_bf16(device: torch.device) -> bool:
    """Whether this GPU computes bf16 natively (compute capability 8.0 or higher). torch.cuda.is_bf16_supported()
    is not the test: in current torch it also answers yes where bf16 is only emulated (its including_emulation
    argument), and emulated bf16 convolutions are far slower than fp16 or have no cuDNN kernel."""
    return torch.cuda.get_device_capability(device) >= NATIVE_CUDA_BF16


def native_bf16(device: torch.device) -> bool:
    """Whether this device computes bf16 in hardware (the CPU's instructions, the GPU's compute capability)."""
    if device.type == "cuda":
        return native_cuda_bf16(device)
    return device.type == "cpu" and native_cpu_bf16()


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast precision of --amp on this device; None = float32. auto is bf16 where the device computes it
    natively; elsewhere fp16 (with the grad scaler) on CUDA and float32 on the CPU. bf16 is bf16 even when emulated
    (train.py warns); fp16 computes in float32 on the CPU (train.py warns)."""
    if cfg.amp == "off":
        return None
    if cfg.amp == "bf16" or (cfg.amp == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else None  # fp16, or auto on a GPU without native bf16


def emulated_bf16_note(cfg: Config, device: torch.device) -> str:
    """The warning for --amp bf16 on a device that only emulates it, or ""."""
    if cfg.amp != "bf16" or native_bf16(device):
        return ""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (f"--amp bf16 on this GPU (compute capability {major}.{minor}, below 8.0) is emulated: the run computes "
                "in bf16 but far slower than in fp16 (or without cuDNN kernels); --amp auto picks fp16 with loss "
                "scaling here")
    return ("--amp bf16 on this CPU is emulated (it has no AVX512-BF16, AMX or Arm BF16 instructions): the run "
            "computes in bf16 but much slower than float32 (12x to 30x on an AVX2 CPU); --amp auto picks float32 "
            "here")


def precision_name(dtype: torch.dtype | None) -> str:
    return f"{str(dtype).removeprefix('torch.')} autocast" if dtype is not None else "float32"


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[None]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---------------------------------------------------------------- the EMA of the weights

def ema_avg_fn(decay):
    """AveragedModel multi_avg_fn with warmup: decay_t = min(decay, (1 + t) / (10 + t)), t = updates so far.

    Early on the average follows the weights closely, so a short run still gets a useful EMA. Integer buffers
    (BatchNorm's num_batches_tracked) are copied, float ones (running mean/var) are averaged like the weights.
    """
    def update(ema_list, model_list, num_averaged):
        t = float(num_averaged)
        d = min(decay, (1 + t) / (10 + t))
        floats = [(e, m) for e, m in zip(ema_list, model_list) if e.is_floating_point()]
        others = [(e, m) for e, m in zip(ema_list, model_list) if not e.is_floating_point()]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1 - d)
        for e, m in others:
            e.copy_(m)
    return update


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An AveragedModel over parameters and buffers, updated after every optimiser step by the training loop."""
    return AveragedModel(model, multi_avg_fn=ema_avg_fn(decay), use_buffers=True)


# ---------------------------------------------------------------- short listings for messages

def short_names(names: Sequence[str], n: int = 5) -> str:
    """'a, b, c, d, e and 3 more'."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def short_list(names: Iterable[str], n: int = 5) -> str:
    """'12 classes: a, b, c, d, e, ...'."""
    names = list(names)
    return f"{len(names)} classes: {', '.join(names[:n])}{', ...' if len(names) > n else ''}"
