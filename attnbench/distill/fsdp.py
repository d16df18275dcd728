"""``distill --fsdp``: the student and the frozen teacher sharded over torchrun's ranks.

Why: a 12B student holds 48 GB of fp32 weights and twice that in AdamW moments, more
than one GPU has. FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps 1/N of every
parameter, gradient and optimiser moment on each of N ranks and all-gathers one
block's weights at a time, for its forward and again for its backward.

How the trainer (``trainer.py``) uses it:

* only rank 0 builds the models whole, on its CPU (it reads the teacher, converts it to
  the student: the inherited weights and the method's own initialisation of its new
  parameters, e.g. LiT's depth-wise conv, SLA's ``proj_l``, exactly as one process
  would); the other ranks build the same modules on the meta device (no memory) from
  their configs (rank 0's, or a pipeline's ``config.json``: :func:`build_device`).
  :class:`Sharded` shards every rank's modules on the meta device, allocates each rank's
  shards (``to_empty``) and fills them from rank 0's tensors (``set_model_state_dict``
  with ``broadcast_from_rank0``; buffers, small and not sharded, broadcast whole). So no
  accelerator ever holds a whole model and no rank but 0 holds one anywhere; rank 0's
  CPU holds the teacher and the student whole until they are sent (what reading them
  from the files costs in any case). ``summary.json``'s ``parameters.bytes_built_by_rank``
  records each rank's bytes built before sharding.
  The teacher makes ``--data self`` samples already sharded, every rank running as many
  forwards (each one a collective): the same weights, all-gathered, so the samples equal
  an unsharded teacher's within float rounding;
* :class:`Sharded` applies ``fully_shard`` to each transformer block (the members of
  the model's ``*blocks`` module lists: DiT's ``blocks``, FLUX's ``transformer_blocks``
  and ``single_transformer_blocks``, Wan's ``blocks``), then to the root (embedders,
  final layer); the teacher the same way, frozen: its forwards run without gradients,
  so it costs only its all-gathers;
* the reduce-scatter averages gradients over the ranks as DDP's all-reduce does, so a
  run's losses, gradient norms and weights equal DDP's within float rounding;
* parameters stay in their dtype and ``--precision bf16`` is autocast, as without FSDP
  (no ``MixedPrecisionPolicy``): FSDP changes where the weights live, not the numerics;
* checkpoints are the file a run without FSDP writes (:meth:`Sharded.full_state`): the
  full model, EMA and optimiser state gathered on rank 0 with the distributed-checkpoint
  state-dict API (``get_model_state_dict``/``get_optimizer_state_dict``, full state dict,
  CPU offload), the optimiser's state keyed by parameter index as
  ``Optimizer.state_dict`` keys it. A one-process run resumes an FSDP run's checkpoint
  and an FSDP run resumes a one-process run's (:meth:`Sharded.load`);
* evaluation and the final export run on rank 0 on full CPU copies gathered there
  (:meth:`Sharded.gather`: the student, its EMA and, once, the teacher), so the written
  model is the one a run without FSDP writes.

:func:`checkpoint_blocks` (``--activation-checkpointing``, with or without FSDP)
recomputes each block's activations in the backward pass instead of keeping them.

Where it is tested (``tests/distill/test_fsdp.py``), all on CPU: under gloo with 2
processes, rank 1 builds attnbench's DiT teacher and LiT student on the meta device and
receives rank 0's weights bit for bit (a non-persistent buffer in another dtype
included); attnbench's DiT with FSDP takes DDP's steps (losses, gradient norms, weights,
EMA, AdamW moments, the exported student) and its checkpoints cross to and from one
process, with activation checkpointing on one side; a tiny diffusers FLUX with FSDP and
activation checkpointing takes DDP's steps with its transformer read by rank 0 alone;
SIGTERM to one rank stops both at the same step, saved, and ``--resume`` continues.
In one process: activation checkpointing gives the plain model's gradients (float64) and
runs under bf16 autocast. The CUDA/NCCL
path (``cuda:LOCAL_RANK`` meshes) is the same code and is not exercised by the CPU suite.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

#: full tensors on rank 0's CPU, nothing elsewhere
_FULL_ON_RANK0 = {"full_state_dict": True, "cpu_offload": True}


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the members of the model's ``*blocks`` module lists."""
    found = [block for name, child in model.named_children()
             if name.endswith("blocks") and isinstance(child, nn.ModuleList) for block in child]
    if not found:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks (a "
                         "ModuleList named *blocks) to shard or checkpoint")
    return found


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant
    ``torch.utils.checkpoint``). The block's forward is wrapped in place, so parameter
    names, state dicts and checkpoints stay those of the plain model."""
    for block in blocks(model):
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor gathered (a collective), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensors (sharded: its forwards are collectives)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def held(model: nn.Module) -> int:
    """The parameter elements this rank holds (its shards)."""
    from torch.distributed.tensor import DTensor

    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
               for p in model.parameters())


@dataclass
class Gathered:
    """Full copies on rank 0's CPU (``None`` on the other ranks)."""

    model: nn.Module | None
    ema: dict[str, torch.Tensor] | None
    teacher: nn.Module | None


class Sharded:
    """``model`` and ``teacher`` sharded in place over every rank of ``info``.

    The weights come from rank 0: it holds each module whole (on its CPU, or wherever it
    was built), while the other ranks may hold meta-device skeletons of the same modules
    (no memory: :func:`build_device`). Every module is moved to the meta device,
    ``fully_shard``-ed, allocated shard by shard (``to_empty``) and filled from rank 0's
    tensors (parameters through the distributed-checkpoint API's ``broadcast_from_rank0``,
    each rank keeping its shard; the buffers, small and replicated, broadcast whole), so
    no device ever holds a whole model and only rank 0 holds one, wherever it built it.
    Rank 0 also keeps a skeleton of each (the modules with their parameters on the meta
    device: no memory) to rebuild full copies from gathered state dicts.
    ``materialised`` is each rank's bytes of parameters not on the meta device at the
    moment of sharding (a test that the other ranks never built the model).
    """

    def __init__(self, model: nn.Module, teacher: nn.Module | None, info) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.is_main = info.is_main
        self.teacher = teacher
        self.mesh = init_device_mesh(info.device.type, (info.world_size,))
        self.materialised = _per_rank(sum(_materialised_bytes(m) for m in (model, teacher)
                                          if m is not None))
        self.skeleton = _skeleton(model) if self.is_main else None
        self.teacher_skeleton = (_skeleton(teacher) if self.is_main and teacher is not None
                                 else None)
        self._teacher_full: nn.Module | None = None
        self._teacher_gathered = False
        for module in (model, teacher):
            if module is not None:
                self._shard_from_main(module, info.device)

    def _shard_from_main(self, module: nn.Module, device: torch.device) -> None:
        """Shard ``module`` (per block, then the root) and fill it with rank 0's tensors."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )
        from torch.distributed.fsdp import fully_shard

        whole = ({k: v.detach().cpu() for k, v in module.state_dict().items()}
                 if self.is_main else {})
        buffers = ({k: v.detach().cpu() for k, v in module.named_buffers()}
                   if self.is_main else {})
        module.to("meta")  # rank 0's own copy is let go: ``whole`` holds its tensors
        _same_dtypes(module, self.is_main)
        for block in blocks(module):
            fully_shard(block, mesh=self.mesh)
        fully_shard(module, mesh=self.mesh)
        module.to_empty(device=device)
        set_model_state_dict(module, whole, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
        with torch.no_grad():
            for name, buffer in module.named_buffers():  # non-persistent ones included
                if self.is_main:
                    buffer.copy_(buffers[name])
                dist.broadcast(buffer, 0)

    # ----- checkpoints ---------------------------------------------------------------------
    def full_state(self, model: nn.Module, ema: dict[str, torch.Tensor],
                   optimizer: torch.optim.Optimizer):
        """``(model, ema, optimizer)`` state dicts in the one-process checkpoint's form on
        rank 0 (``None`` elsewhere); every rank must call it."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(**_FULL_ON_RANK0)
        model_state = get_model_state_dict(model, options=options)
        ema_state = _gather_tensors(ema, self.is_main)
        optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
        if not self.is_main:
            return None
        return model_state, ema_state, by_index(optimizer_state)

    def load(self, model: nn.Module, optimizer: torch.optim.Optimizer,
             ema: dict[str, torch.Tensor], state: dict[str, Any], names: list[str]) -> None:
        """Restore a checkpoint (full state dicts, every rank holding it) into the shards;
        ``names`` are the trained parameters in the optimiser's order."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, by_name(state["optimizer"], names),
                                 options=options)
        for group, saved in zip(optimizer.param_groups, state["optimizer"]["param_groups"],
                                strict=True):  # the settings as saved (betas stay a tuple)
            group.update({k: v for k, v in saved.items() if k != "params"})
        for key, like in ema.items():
            ema[key] = _shard_like(state["ema"][key].float(), like)

    # ----- evaluation and export -----------------------------------------------------------
    def gather(self, model: nn.Module, ema: dict[str, torch.Tensor] | None) -> Gathered:
        """Full CPU copies of ``model``, ``ema`` and the teacher on rank 0 (a collective)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(**_FULL_ON_RANK0)
        model_state = get_model_state_dict(model, options=options)
        ema_state = _gather_tensors(ema, self.is_main) if ema is not None else None
        if self.teacher is not None and not self._teacher_gathered:  # frozen: once
            teacher_state = get_model_state_dict(self.teacher, options=options)
            if self.is_main:
                self._teacher_full = _rebuild(self.teacher_skeleton, teacher_state)
            self._teacher_gathered = True
        if not self.is_main:
            return Gathered(None, None, None)
        return Gathered(_rebuild(self.skeleton, model_state), ema_state, self._teacher_full)


def by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimiser state dict keyed by parameter name (the distributed-checkpoint form)
    keyed by index instead, as ``Optimizer.state_dict`` numbers the parameters: in the
    order of the groups and of the parameters within each."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": groups}


def by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`by_index`: ``names`` are the parameters in the optimiser's
    order."""
    groups = [{**group, "params": [names[i] for i in group["params"]]}
              for group in state["param_groups"]]
    return {"state": {names[int(i)]: value for i, value in state["state"].items()},
            "param_groups": groups}


def _gather_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Every tensor whole (DTensors gathered, one at a time), on CPU where ``keep``."""
    out = {}
    for key, value in tensors.items():
        whole = full(value.detach())
        if keep:
            out[key] = whole.cpu()
    return out


def _shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``whole`` laid out as ``like`` (no communication: every rank
    holds ``whole``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return whole.to(like.device)
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements,
                             src_data_rank=None)


def build_device(info, fsdp: bool, usual: torch.device | str) -> torch.device:
    """Where a model is built: ``usual`` without ``fsdp``; with it, rank 0's CPU (the one
    whole copy, never on an accelerator) and the meta device on the other ranks (no
    memory), :class:`Sharded` filling every rank's shards from rank 0's tensors."""
    if not fsdp:
        return torch.device(usual)
    return torch.device("cpu" if info.is_main else "meta")


def _same_dtypes(module: nn.Module, is_main: bool) -> None:
    """Rank 0's dtype for every tensor of ``module`` (on the meta device: a skeleton built
    elsewhere may miss a float32 module its loader keeps)."""
    import torch.distributed as dist

    mine = {name: t.dtype for name, t in (*module.named_parameters(),
                                          *module.named_buffers())}
    box = [mine if is_main else None]
    dist.broadcast_object_list(box, 0)
    with torch.no_grad():
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            want = box[0][name]
            if t.dtype == want:
                continue
            if isinstance(t, nn.Parameter):
                t.data = t.data.to(want)
            else:
                owner, _, attr = name.rpartition(".")
                setattr(module.get_submodule(owner), attr, t.to(want))


def _materialised_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters that hold memory (not on the meta device)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if not p.is_meta)


def _per_rank(value: int) -> list[int]:
    """``value`` of every rank, in rank order (a collective)."""
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters lie on the meta device (no memory); its
    buffers (small: non-persistent ones are in no state dict) are copied to the CPU."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.detach().cpu().clone()
    return copy.deepcopy(module, memo)


def _rebuild(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A full module: ``skeleton`` with ``state``'s tensors as its parameters."""
    module = copy.deepcopy(skeleton)
    module.load_state_dict(state, assign=True)
    return module.eval()
