"""``swap_attention``: put a registered method into a diffusers transformer, and take it out.

>>> handle = swap_attention(transformer, "clear", radius=16)   # doctest: +SKIP
>>> out = transformer(**inputs)                                # CLEAR in every self-attention
>>> handle.new_parameters                                      # the method's learned parts
>>> handle.restore()                                           # the stock processors again

Which modules are replaced, per family (cross-attention is left as it is):

=========  =====================================================  =========================
family     modules                                                stock processor
=========  =====================================================  =========================
FLUX       ``transformer_blocks.*.attn``, ``single_transformer_``  ``FluxAttnProcessor``
           ``blocks.*.attn``
SD3        ``transformer_blocks.*.attn`` (joint), ``.attn2``       ``JointAttnProcessor2_0``
           (SD3.5 dual attention, image only)
PixArt     ``transformer_blocks.*.attn1``                          ``AttnProcessor2_0``
DiT        ``transformer_blocks.*.attn1``                          ``AttnProcessor2_0``
SANA       ``transformer_blocks.*.attn1``                          ``SanaLinearAttnProcessor2_0``
Wan        ``blocks.*.attn1``                                      ``WanAttnProcessor``
=========  =====================================================  =========================

The conversion recipe is the one attnbench's DiT conversion uses: the stock
model's q/k/v/out projections are inherited, unless the method's
``inherits_projections`` is False (LiT re-initialises them: Xavier-uniform,
bias 0), and the method's own parts are new. The heads follow
:func:`head_split`, per family (``Family.per_head``): the checkpoint's where a
part of the attention is defined per head -- FLUX (per-head RMS QK norms, RoPE),
SD3.5 (per-head QK norms), Wan (3-D RoPE over the head dim) -- and the
method's rule elsewhere -- PixArt and DiT (``attn1`` has no QK norm and no
RoPE), SANA (its norms span all heads), SD3 without QK norms: LiT gets its
few heads there, ``max(2, heads // 4)`` (PixArt-Σ: 16 → 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ... import attention
from . import geometry as geo
from .families import Family, family_of
from .processors import AttnbenchProcessor

#: projection names of a diffusers attention module (image stream, then the text stream)
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
               "to_add_out")


def attention_layers(transformer: nn.Module,
                     family: Family) -> list[tuple[str, nn.Module, str]]:
    """``(state-dict prefix, module, kind)`` of every self-attention module the family
    swaps, in the model's order (FLUX: the 19 double-stream blocks, then the 38
    single-stream ones -- the order of ``transformer.attn_processors``)."""
    found = []
    for blocks, kind in zip(family.blocks, family.kinds, strict=True):
        for i, block in enumerate(getattr(transformer, blocks, None) or ()):
            for attr in family.modules:
                module = getattr(block, attr, None)
                if module is not None:
                    found.append((f"{blocks}.{i}.{attr}", module, kind))
    return found


def attention_modules(transformer: nn.Module, family: Family) -> list[tuple[str, nn.Module]]:
    """``(state-dict prefix, module)`` of every self-attention module the family swaps."""
    return [(name, module) for name, module, _ in attention_layers(transformer, family)]


def kd_attn_modules(transformer: nn.Module, recipe) -> list[str]:
    """The attention modules a distillation recipe's ``kd_attn`` taps in ``transformer``
    (:meth:`~attnbench.attention.recipes.DistillRecipe.tapped_layers` over the model's
    layers and their kinds; CLEAR on FLUX: ``single_transformer_blocks.{1,5,...,37}.attn``)."""
    layers = attention_layers(transformer, family_of(transformer))
    return [layers[i][0] for i in recipe.tapped_layers([kind for *_, kind in layers])]


def _check_stock(name: str, module: nn.Module, family: Family) -> None:
    """Refuse modules whose current processor is not the stock one this adapter reproduces."""
    processor = module.processor
    if isinstance(processor, AttnbenchProcessor):
        raise ValueError(f"{name}: attnbench processors are installed already; "
                         "restore() the previous swap first")
    stock = family.processor.stock
    if type(processor).__name__ != stock:
        raise ValueError(
            f"{name}: processor {type(processor).__name__} is not the stock {stock} "
            "(IP-Adapter, PAG, fused projections and custom processors are not handled); "
            "set the stock processor back first"
        )
    if getattr(processor, "_parallel_config", None) is not None:
        raise ValueError(f"{name}: context parallelism is not handled by attnbench's processors")
    if getattr(module, "fused_projections", False):
        raise ValueError(f"{name}: fused QKV projections are not handled; call "
                         "transformer.unfuse_qkv_projections() first")
    for part in ("spatial_norm", "group_norm"):
        if getattr(module, part, None) is not None:
            raise ValueError(f"{name}: {part} is not handled by attnbench's processors")


def _heads(module: nn.Module) -> tuple[int, int]:
    heads = int(module.heads)
    return heads, int(module.to_q.out_features) // heads


#: why each per-head part fixes the head split
PER_HEAD = {"norm_q": "its QK norms are per head (their weights span one head's dim)",
            "rope": "its rotary embedding turns channel pairs of one head's dim"}


def head_split(module: nn.Module, family: Family,
               backend: attention.AttentionBackend) -> tuple[int, str]:
    """``(heads, why)``: the student's heads of one attention module, and the reason.

    The checkpoint's heads where a part of the module is defined per head
    (``family.per_head``: FLUX's per-head RMS QK norms and RoPE, SD3.5's QK norms, Wan's
    RoPE); elsewhere (PixArt's and DiT's ``attn1``: no QK norm, no RoPE; SANA's norms
    span all heads; SD3 without QK norms) the method's conversion rule, as attnbench's DiT
    conversion applies it -- LiT: ``max(2, heads // 4)``. A head split is a reshape of
    the projections, so the inherited (or re-initialised) weights serve either way.
    """
    heads, head_dim = _heads(module)
    present = [part for part in family.per_head
               if part == "rope" or getattr(module, part, None) is not None]
    if present:
        return heads, f"the checkpoint's {heads}: " + "; ".join(PER_HEAD[p] for p in present)
    recipe = backend.conversion_recipe
    if recipe is None or recipe.heads is None:
        return heads, f"the checkpoint's {heads} (the method's rule)"
    student = recipe.student_heads(heads, heads * head_dim)
    return student, f"{student} by the method's rule {recipe.heads_rule} (no per-head part)"


@dataclass
class SwapHandle:
    """What ``swap_attention`` did, and ``restore()`` to undo it.

    ``modules`` -- the swapped modules' names; ``new_parameters`` -- state-dict
    keys of the method's learned parts (``…processor.core.*``); ``inherited`` --
    the projections kept from the stock model; ``reinitialised`` -- those
    re-initialised by the recipe (LiT). ``restore()`` puts back the original
    processors and removes the hook; re-initialised projections stay as they are.
    """

    transformer: nn.Module
    method: str
    options: dict[str, Any]
    family: str
    modules: list[str]
    new_parameters: list[str]
    inherited: list[str]
    reinitialised: list[str]
    geometry: geo.Geometry
    #: each swapped module's student heads and why (:func:`head_split`)
    heads: dict[str, str] = field(default_factory=dict)
    _heads: dict[str, int] = field(default_factory=dict, repr=False)
    _theta: Any = field(default=None, repr=False)
    _originals: dict[str, Any] = field(default_factory=dict, repr=False)
    _hooks: list[Any] = field(default_factory=list, repr=False)

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def restore(self) -> None:
        """Put the stock processors back and remove the geometry hook (idempotent)."""
        by_name = dict(self.transformer.named_modules())
        for name, processor in self._originals.items():
            by_name[name].set_processor(processor)
        for name, heads in self._heads.items():
            by_name[name].heads = heads
        if self._theta is not None:
            self.transformer.pos_embed.theta = self._theta
            self._theta = None
        self._originals.clear()
        self._heads.clear()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for results rows and reports."""
        new = set(self.new_parameters)
        return {
            "method": self.method, "options": dict(self.options), "family": self.family,
            "modules": len(self.modules), "new_parameters": len(self.new_parameters),
            "new_parameter_count": sum(p.numel() for n, p in self.transformer.named_parameters()
                                       if n in new),
            "projections": "re-initialised" if self.reinitialised else "inherited",
            "heads": sorted(set(self.heads.values())),
        }


def _reinitialise(module: nn.Module, prefix: str) -> list[str]:
    """LiT's recipe on one attention module: Xavier-uniform projections, zero biases."""
    names = []
    for proj in PROJECTIONS:
        linear = module.get_submodule(proj) if _has(module, proj) else None
        if not isinstance(linear, nn.Linear):
            continue
        nn.init.xavier_uniform_(linear.weight)
        names.append(f"{prefix}.{proj}.weight")
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
            names.append(f"{prefix}.{proj}.bias")
    return names


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _projection_names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{proj}.{n}" for proj in PROJECTIONS if _has(module, proj)
            for n, _ in module.get_submodule(proj).named_parameters()]


def swap_attention(
    transformer: nn.Module,
    method: str | attention.AttentionBackend,
    *,
    inherit_projections: bool | None = None,
    keep_heads: bool = False,
    impl: str = "auto",
    **options: Any,
) -> SwapHandle:
    """Install ``method`` in every self-attention of a diffusers transformer.

    ``method`` -- a registered name or an :class:`~attnbench.attention.AttentionBackend`;
    ``options`` -- the method's options (its mixer options included), validated
    before anything changes; ``impl`` forces an implementation as in ``attend``;
    ``inherit_projections=None`` follows the method's recipe
    (``backend.inherits_projections``); the heads follow :func:`head_split` unless
    ``keep_heads`` keeps the checkpoint's everywhere (to compare with the stock model).
    An ``ntk_factor`` option other than 1 (CLEAR's high-resolution RoPE) multiplies the
    model's RoPE base ``pos_embed.theta`` until ``restore()``.
    Raises ``ValueError`` for an unsupported class or a module whose processor is not the
    stock one.
    """
    backend = method if isinstance(method, attention.AttentionBackend) else attention.get(method)
    resolved = backend.resolve(dict(options), mixer=True)  # bad options fail before any change
    family = family_of(transformer)
    targets = attention_modules(transformer, family)
    if not targets:
        raise ValueError(f"swap_attention: no attention modules found in "
                         f"{type(transformer).__name__}")
    for name, module in targets:
        _check_stock(name, module, family)
    ntk = float(resolved.get("ntk_factor", 1.0))
    rope = getattr(transformer, "pos_embed", None)
    if ntk != 1.0 and not hasattr(rope, "theta"):
        raise ValueError(f"swap_attention: ntk_factor={ntk:g} scales a RoPE base; "
                         f"{type(transformer).__name__} has no pos_embed.theta (FLUX has)")
    inherit = (bool(backend.inherits_projections) if inherit_projections is None
               else bool(inherit_projections))
    geometry = geo.Geometry()
    handle = SwapHandle(transformer, backend.name, resolved, family.name, [], [], [], [],
                        geometry)
    for name, module in targets:
        weight = module.to_q.weight
        heads, why = (module.heads, "the checkpoint's (keep_heads)") if keep_heads else \
            head_split(module, family, backend)
        if heads != module.heads:  # the processors split q, k, v by ``module.heads``
            handle._heads[name] = module.heads
            module.heads = heads
        handle.heads[name] = why
        core = backend.core(*_heads(module), impl=impl, **resolved)
        core = core.to(device=weight.device, dtype=weight.dtype)
        processor = family.processor(core, geometry, where=name)
        handle._originals[name] = module.processor
        module.set_processor(processor)
        handle.modules.append(name)
        handle.new_parameters += [f"{name}.processor.core.{p}" for p in core.new_parameters()]
        if inherit:
            handle.inherited += _projection_names(module, name)
        else:
            with torch.no_grad():
                handle.reinitialised += _reinitialise(module, name)
    if ntk != 1.0:  # NTK-scaled RoPE, as CLEAR's FluxPosEmbed(ntk_factor): θ·ntk_factor
        handle._theta = rope.theta
        rope.theta = rope.theta * ntk
    handle._hooks.append(geo.install_hook(transformer, geometry, family.geometry))
    return handle
