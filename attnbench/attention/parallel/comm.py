"""The collectives of sequence-parallel attention: counted, timed out, differentiable.

Every byte a strategy moves goes through a :class:`Comm`, which counts it from the
tensors' sizes (the measured column of the benchmarks, beside the analytic models of
``model.py``), waits on each collective with a timeout (a rank that died or diverged
makes the others raise :class:`CollectiveTimeout` instead of hanging) and runs
backward through it (each operation is an ``autograd.Function`` whose backward is the
transposed communication).

Bytes sent per rank, by operation (the traffic a bandwidth-optimal algorithm needs;
what one rank hands to the others, never its copy to itself):

* ``all_gather`` of ``x``: ``(P − 1)·|x|`` (``x`` reaches every other rank);
* ``all_to_all`` of chunks: the chunks addressed to other ranks;
* ``exchange`` (point-to-point, halos and rings): every tensor sent;
* ``all_reduce`` of ``x``: ``2(P − 1)/P·|x|`` (ring all-reduce: reduce-scatter then
  all-gather).

Gloo (CPU) has no reduce-scatter and its all-to-all needs equal chunks, so the
operations use only all-gather, equal-chunk all-to-all, all-reduce and batched
point-to-point sends, which NCCL and gloo both provide.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections import Counter

import torch
import torch.distributed as dist

#: seconds a collective may wait for the other ranks before the call fails
DEFAULT_TIMEOUT_S = 120.0
#: counter key of the argument check (not attention data: left out of ``data_bytes``)
CHECK = "check"


class CollectiveTimeout(RuntimeError):
    """A collective did not complete in time: another rank failed, stopped or diverged."""


class Comm:
    """One process group as sequence-parallel attention uses it: rank, world size,
    the timeout of every wait and a counter of the bytes this rank sent (``sent``:
    ``{operation: bytes}``, backward traffic under ``"<op>.backward"``)."""

    def __init__(self, group: dist.ProcessGroup | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("attend_parallel needs an initialised torch.distributed process "
                             "group: launch with torchrun (or init_process_group) first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.timeout_s = float(timeout_s)
        self.sent: Counter[str] = Counter()

    # ----- bookkeeping --------------------------------------------------------------
    def count(self, op: str, nbytes: float) -> None:
        self.sent[op] += float(nbytes)

    @property
    def data_bytes(self) -> float:
        """Bytes of attention data this rank sent (every operation but the argument check)."""
        return float(sum(v for k, v in self.sent.items() if k != CHECK))

    def reset(self) -> None:
        self.sent.clear()

    def global_rank(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def wait(self, work, what: str) -> None:
        """Wait for ``work`` at most the timeout; a failure names the operation and rank."""
        try:
            if work is not None:
                work.wait(_dt.timedelta(seconds=self.timeout_s))
        except RuntimeError as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CollectiveTimeout(
                f"rank {self.rank}/{self.world}: {what} did not complete within "
                f"{self.timeout_s:g} s: another rank failed, stopped or called with other "
                f"arguments ({first})") from None

    # ----- raw collectives (no autograd) -------------------------------------------------
    def _all_gather(self, x: torch.Tensor, op: str) -> list[torch.Tensor]:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.wait(dist.all_gather(parts, x, group=self.group, async_op=True), f"{op} all_gather")
        self.count(op, (self.world - 1) * _nbytes(x))
        return parts

    def _all_to_all(self, chunks: list[torch.Tensor], op: str) -> list[torch.Tensor]:
        chunks = [c.contiguous() for c in chunks]
        outs = [torch.empty_like(chunks[self.rank]) for _ in range(self.world)]
        self.wait(dist.all_to_all(outs, chunks, group=self.group, async_op=True),
                  f"{op} all_to_all")
        self.count(op, sum(_nbytes(c) for i, c in enumerate(chunks) if i != self.rank))
        return outs

    def _exchange(self, sends: dict[int, torch.Tensor],
                  receives: dict[int, tuple[tuple[int, ...], torch.dtype, torch.device]],
                  op: str) -> dict[int, torch.Tensor]:
        got = {p: torch.empty(shape, dtype=dtype, device=device)
               for p, (shape, dtype, device) in receives.items()}
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.global_rank(p), self.group)
               for p, t in sorted(sends.items())]
        ops += [dist.P2POp(dist.irecv, t, self.global_rank(p), self.group)
                for p, t in sorted(got.items())]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                self.wait(work, f"{op} send/receive")
        self.count(op, sum(_nbytes(t) for t in sends.values()))
        return got

    def _all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        x = x.contiguous().clone()
        self.wait(dist.all_reduce(x, group=self.group, async_op=True), f"{op} all_reduce")
        self.count(op, 2.0 * (self.world - 1) / self.world * _nbytes(x))
        return x

    # ----- differentiable operations ------------------------------------------------------
    def all_gather(self, x: torch.Tensor, dim: int, op: str = "all_gather") -> torch.Tensor:
        """Every rank's ``x`` concatenated along ``dim`` in rank order."""
        return _AllGather.apply(self, x, dim, op)

    def all_to_all(self, chunks: list[torch.Tensor], op: str = "all_to_all"
                   ) -> list[torch.Tensor]:
        """Chunk ``j`` goes to rank ``j``; returns what each rank sent to this one (equal
        shapes: gloo's all-to-all takes nothing else)."""
        return list(_AllToAll.apply(self, op, *chunks))

    def exchange(self, sends: dict[int, torch.Tensor],
                 shapes: dict[int, tuple[int, ...]], like: torch.Tensor,
                 op: str = "exchange") -> dict[int, torch.Tensor]:
        """Point-to-point: ``sends[p]`` goes to rank ``p``; ``shapes[p]`` is what arrives
        from rank ``p`` (dtype and device of ``like``)."""
        peers = sorted(sends)
        receives = {p: (tuple(s), like.dtype, like.device) for p, s in shapes.items()}
        out = _Exchange.apply(self, op, peers, receives, *(sends[p] for p in peers))
        return dict(zip(sorted(receives), out, strict=True))

    def all_reduce(self, x: torch.Tensor, op: str = "all_reduce") -> torch.Tensor:
        """The sum of every rank's ``x``."""
        return _AllReduce.apply(self, x, op)

    # ----- the argument check --------------------------------------------------------------
    def check_same(self, fingerprint: str, what: str) -> None:
        """Raise ValueError on every rank unless every rank passed the same ``fingerprint``."""
        digest = torch.tensor(list(hashlib.sha256(fingerprint.encode()).digest()),
                              dtype=torch.uint8)
        if self.backend == "nccl":
            digest = digest.cuda()
        parts = self._all_gather(digest, CHECK)
        differ = [r for r, p in enumerate(parts) if not torch.equal(p, parts[0])]
        if differ:
            raise ValueError(f"{what}: rank{'s' if len(differ) > 1 else ''} "
                             f"{', '.join(map(str, differ))} called with other arguments than "
                             f"rank 0 (this rank: {fingerprint}); every rank must pass the same "
                             "method, strategy, options, layout, shape and dtype")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm: Comm, x, dim: int, op: str):
        ctx.comm, ctx.dim, ctx.op = comm, dim, op
        return torch.cat(comm._all_gather(x, op), dim=dim)

    @staticmethod
    def backward(ctx, grad):
        comm = ctx.comm
        # every rank's gradient of this rank's slice, summed (gloo has no reduce-scatter)
        parts = comm._all_to_all(list(grad.chunk(comm.world, dim=ctx.dim)), ctx.op + ".backward")
        return None, torch.stack(parts).sum(0), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm: Comm, op: str, *chunks):
        ctx.comm, ctx.op = comm, op
        return tuple(comm._all_to_all(list(chunks), op))

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, *ctx.comm._all_to_all(list(grads), ctx.op + ".backward"))


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm: Comm, op: str, peers: list[int], receives, *tensors):
        ctx.comm, ctx.op, ctx.peers = comm, op, peers
        ctx.receives = sorted(receives)
        ctx.sent = {p: (tuple(t.shape), t.dtype, t.device) for p, t in zip(peers, tensors,
                                                                              strict=True)}
        got = comm._exchange(dict(zip(peers, tensors, strict=True)), receives, op)
        return tuple(got[p] for p in ctx.receives)

    @staticmethod
    def backward(ctx, *grads):
        # the transpose: gradients go back to where their tensors came from
        back = ctx.comm._exchange(dict(zip(ctx.receives, grads, strict=True)), ctx.sent,
                                  ctx.op + ".backward")
        return (None, None, None, None, *(back[p] for p in ctx.peers))


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm: Comm, x, op: str):
        ctx.comm, ctx.op = comm, op
        return comm._all_reduce(x, op)

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.comm._all_reduce(grad, ctx.op + ".backward"), None
