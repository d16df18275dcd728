"""Several processes: ``torchrun --nproc_per_node N -m attnbench distill ...``.

torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``; :func:`setup`
joins the process group (NCCL on CUDA, gloo on CPU) and pins each rank to its
GPU. Without torchrun everything here degrades to a single process and no
``torch.distributed`` call is made.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join torchrun's process group (if launched by it) and choose this rank's device.

    ``device`` ``None`` means CUDA when available, else CPU; with several
    processes on CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    want = torch.device(device) if device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if want.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to torch "
                         f"{torch.__version__}; use --device cpu")
    if not launched_by_torchrun():
        return DistInfo(device=want)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if want.type == "cuda" else "gloo"
    if want.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} wants cuda:{local} but only "
                             f"{torch.cuda.device_count()} GPUs are visible")
        want = torch.device("cuda", local)
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, want, backend)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def mean_across(info: DistInfo, values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (logging: every rank logs the global batch)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                     device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    t /= info.world_size
    return dict(zip(keys, t.tolist(), strict=True))


def broadcast_flag(info: DistInfo, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. "stop now" from a time limit)."""
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=info.device if info.backend == "nccl" else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


def max_across(info: DistInfo, value: int) -> int:
    """The largest of every rank's ``value`` (e.g. the signal one rank received, 0 for none:
    every rank learns it at the same point)."""
    if not info.enabled:
        return value
    t = torch.tensor([int(value)], device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def broadcast_object(info: DistInfo, obj):
    """Rank 0's picklable ``obj`` on every rank (an error message, a small dict)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def gather_rows(info: DistInfo, rows: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank holds rows ``rank::world`` of a ``[total, ...]`` tensor: rebuild it everywhere."""
    if not info.enabled:
        return rows
    per = -(-total // info.world_size)
    device = info.device if info.backend == "nccl" else torch.device("cpu")
    padded = torch.zeros((per, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: len(rows)] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    out = torch.empty((total, *rows.shape[1:]), dtype=rows.dtype)
    for r, part in enumerate(parts):
        count = len(range(r, total, info.world_size))
        out[r::info.world_size] = part[:count].cpu()
    return out
