"""Zero-shot: how close each method is to softmax on a model's own activations.

Before any training, on the *same* inputs, this asks of every attention method (and
option variant) how far it lands from the softmax attention the model was trained
with -- per attention layer and per diffusion timestep, then end to end.

Per layer × timestep × variant, on the q, k, v the model itself computes there
(captured with a forward pre-hook on each block's mixer and re-projected with the
mixer's own ``split_heads``, in float64; nothing in the model changes):

* ``rel_error`` = ‖O_m − O_sm‖ / ‖O_sm‖ and ``cosine`` of O_m and O_sm, over the
  whole layer output before the output projection (all images, tokens, channels);
  O_sm is softmax attention in float64, computed in query-row chunks;
* ``mass_recall`` -- the fraction of softmax's probability mass that lies on the
  pairs the method computes exactly (mean over query rows, heads and images):
  1 for softmax; CLEAR's circular window with its global tokens; SLA's critical
  blocks. Not defined (NaN, with the reason in ``mass_recall_note``) where the
  method computes no pair exactly (LiT) or splits the heads differently from the
  model (the maps would not be the model's);
* for softmax itself: ``entropy`` of the attention rows (nats; ``entropy_norm``
  divides by log N), the ``erank`` (effective rank, Roy & Vetterli 2007: exp of
  the entropy of the normalised singular values) of the maps -- CLEAR's
  "high-rank" factor -- and the locality curve: the mass within grid radius r
  (``dy² + dx² < r²``, CLEAR's window) for every r (``locality.csv``), summarised
  by ``radius_50`` / ``radius_90``, the smallest radius that holds half / 90 % (of the
  mass on image-token pairs; with text tokens, ``text_mass`` is the mass on pairs with a
  text token, and the curve counts image pairs: distances over frames, rows, columns).

What "the method" computes on a layer: when the converted student inherits the
model's projections at that layer (CLEAR, SLA), it is the student's own layer
(its ``core`` in float64: SLA's zero-initialised linear-branch projection makes a
fresh SLA layer block-sparse softmax, CLEAR's pooled tokens use their initial
weights); when conversion re-initialises the projections (LiT's recipe), the
student's layer sees other q, k, v, so what is measured is the method's operator
(``attend``) on the model's q, k, v, learned parts (LiT's depth-wise conv) left
out. The ``computed`` column says which. A variant with other heads than the
model (``lit:heads=2``) splits the same q, k, v projections into its heads.

End to end, every layer swapped at once (:func:`attnbench.convert`, the student
as it runs, in float32): the relative error and MSE of the student's ε against
the model's on the same noised inputs, per timestep, and the PSNR of a short DDIM
trajectory of each from the same noise and labels.

Inputs: shapes-world images (the shipped teacher's world) noised to each timestep with
fixed noise, or clean inputs of the model's own from a file (:func:`load_inputs`: any
softmax DiT's latents or pixels, with its class labels).

Cost: one layer's q, k, v at a time (the analysis runs inside the hook), N×N
quantities in chunks of query rows (``chunk_elements`` scores at once), the
effective rank on a uniform sample of query rows (``erank_elements`` at once;
exact when every row fits).
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from tqdm.auto import tqdm

from .. import attention
from ..attention.inputs import Grid
from ..attention.layout import Layout
from ..attention.specs import parse_methods
from ..data.shapes import ShapesWorld
from ..diffusion import Diffusion
from ..models.convert import convert
from .fidelity import psnr

#: files a zero-shot run (``python -m attnbench fidelity``) writes beside the results table
FIDELITY_CSV = "fidelity.csv"
END_TO_END_CSV = "end_to_end.csv"
LOCALITY_CSV = "locality.csv"
#: the shipped teacher's grid is 8×8 tokens: SLA's blocks of 64 would cover it whole
DEFAULT_METHODS = "lit,clear:radius=2,clear:radius=3,sla:topk=0.25:block_q=8:block_kv=8"
DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)
#: scores held at once by the row-chunked softmax pass (float64: 32 MiB)
CHUNK_ELEMENTS = 1 << 22
#: attention-map entries kept for the effective rank (float64: 128 MiB)
ERANK_ELEMENTS = 1 << 24
#: pass-through option: the student's head count (a conversion choice, not attend's)
HEADS_OPTION = "heads"
#: metrics of a variant's summary row and their direction
HIGHER_IS_BETTER = {"rel_error": False, "cosine": True, "mass_recall": True,
                    "eps_rel_error": False, "eps_mse": False, "psnr_trajectory": True}
#: methods whose every pair is exact softmax
LIT_NOTE = "not defined: LiT computes no pair exactly (every score is φ(q)·φ(k))"


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """One method with its options and the student's head count (``None``: the recipe's).

    ``student`` -- a trained diffusers student's folder (``--student``): the variant is
    that student loaded on the model, not a fresh conversion."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)
    heads: int | None = None
    student: str | None = None

    @property
    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.options.items())]
        if self.heads is not None:
            parts.append(f"{HEADS_OPTION}={self.heads}")
        if self.student is not None:
            parts.append(f"student={self.student}")
        return ":".join([self.method, *parts])


def parse_variants(text: str, method_options: Sequence[str] = ()) -> list[Variant]:
    """``"softmax,lit:heads=2,clear:radius=3"`` → variants (``run``'s syntax, plus ``heads=``).

    The method options go through :func:`attnbench.attention.specs.parse_methods` (the one
    parser of method specs); ``heads=N`` is taken off first: it is the student's
    head count at conversion, not an option of the method.
    """
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError("--methods is empty: give e.g. lit,clear:radius=3")
    plain, heads = [], []
    for item in items:
        kept, count = [], None
        for i, part in enumerate(item.split(":")):
            key, sep, value = part.partition("=")
            if i and sep and key.strip() == HEADS_OPTION:
                try:
                    count = int(value)
                except ValueError:
                    count = -1
                if count <= 0:
                    raise ValueError(f"--methods {item!r}: heads={value!r} is not a positive "
                                     "integer (the student's head count, e.g. lit:heads=2)")
                continue
            kept.append(part)
        plain.append(":".join(kept))
        heads.append(count)
    specs = parse_methods(plain, method_options)
    return [Variant(s.name, dict(s.options), h) for s, h in zip(specs, heads, strict=True)]


def with_softmax(variants: list[Variant]) -> list[Variant]:
    """Softmax first (the check that the measurement reads 0 and 1), then the rest."""
    softmax = Variant("softmax")
    return [softmax, *(v for v in variants if v != softmax)]


# --------------------------------------------------------------------------- heads


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, d]`` → ``[B, N, H·d]`` (the layout the output projection reads)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, H, N, d]`` → ``[B, heads, N, H·d/heads]``: the same channels, other heads."""
    if heads == x.shape[1]:
        return x
    b, _, n, _ = x.shape
    return merge_heads(x).reshape(b, n, heads, -1).transpose(1, 2)


# --------------------------------------------------------------------------- exact pairs


#: ``mask(r0, r1)`` → bool broadcastable to ``[B, H, r1 - r0, N]``: pairs computed exactly
MaskFn = Callable[[int, int], torch.Tensor]


def exact_pairs(variant: Variant, q: torch.Tensor, k: torch.Tensor, grid: Grid,
                options: dict[str, Any]) -> tuple[MaskFn | None, str]:
    """The pairs ``variant`` computes exactly on these q, k (the model's heads), or why none.

    The method's own :meth:`~attnbench.attention.AttentionBackend.exact_pairs` (CLEAR's
    window and text tokens, SLA's critical blocks in its token order, every pair for
    softmax). ``options`` are the variant's resolved options. Returns ``(mask, note)``;
    ``mask`` is ``None`` when mass recall is not defined, and ``note`` says why.
    """
    if variant.heads is not None and variant.heads != q.shape[1] and variant.method != "lit":
        return None, (f"not defined: {variant.heads} heads split the maps differently from "
                      f"the model's {q.shape[1]}")
    backend = attention.get(variant.method)
    rows = backend.exact_pairs(q, k, grid, **backend.attend_options(options))
    if rows is None:
        return None, (LIT_NOTE if variant.method == "lit" else
                      f"not defined: {variant.method} computes no pair exactly")
    pooled = (" (pooled K/V tokens are not exact pairs)"
              if options.get("down_factor", 0) > 1 else "")
    return rows, f"{backend.density(grid, **backend.attend_options(options)):.1%} of pairs" + pooled


# --------------------------------------------------------------------------- softmax pass


@dataclass
class SoftmaxPass:
    """Softmax attention of one layer and its statistics, from the row-chunked pass."""

    out: torch.Tensor  # [B, H, N, d], float64
    entropy: float  # mean over rows, heads, images (nats)
    entropy_norm: float  # entropy / log N
    erank: float  # mean over heads and images
    erank_rows: int  # query rows the effective rank was computed on (N: exact)
    #: [D2 + 1]: mean mass per squared grid distance between image tokens (with
    #: ``text_mass``, sums to 1)
    locality: torch.Tensor
    mass_recall: dict[str, float]  # per mask name
    #: mean mass on pairs with a text token (0 without text)
    text_mass: float = 0.0


def token_coordinates(geometry: Grid | Layout, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``([N, 3] (t, y, x) grid coordinates, [N] is-text)`` of the tokens of ``geometry``
    in their order (a plain grid, or a layout with text tokens and frames)."""
    layout = geometry if isinstance(geometry, Layout) else Layout(tuple(geometry))
    _, h, w = layout.grid if layout.is_video else (1, *layout.grid)
    index = torch.arange(layout.image_tokens, device=device)
    coords = torch.zeros(layout.tokens, 3, dtype=torch.long, device=device)
    coords[layout.image_slice] = torch.stack((index // (h * w), index // w % h, index % w), -1)
    text = torch.zeros(layout.tokens, dtype=torch.bool, device=device)
    text[layout.text_slice] = True
    return coords, text


def squared_distances(geometry: Grid | Layout, r0: int, r1: int, device=None) -> torch.Tensor:
    """``[r1 - r0, N]`` integer ``dt² + dy² + dx²`` between query rows and every key; -1
    where the query or the key is a text token (no place on the grid)."""
    coords, text = token_coordinates(geometry, device)
    diff = coords[r0:r1, None, :] - coords[None, :, :]
    d2 = (diff * diff).sum(-1)
    return d2.masked_fill(text[r0:r1, None] | text[None, :], -1)


def max_squared_distance(geometry: Grid | Layout) -> int:
    layout = geometry if isinstance(geometry, Layout) else Layout(tuple(geometry))
    return sum((side - 1) ** 2 for side in layout.grid)


def effective_rank(maps: torch.Tensor) -> torch.Tensor:
    """exp(entropy of σ / Σσ) of each matrix ``[..., m, N]`` (Roy & Vetterli 2007)."""
    sigma = torch.linalg.svdvals(maps)
    p = sigma / sigma.sum(-1, keepdim=True).clamp_min(torch.finfo(sigma.dtype).tiny)
    return torch.exp(-torch.special.xlogy(p, p).sum(-1))


def erank_sample(n: int, batch_heads: int, budget: int = ERANK_ELEMENTS) -> torch.Tensor:
    """Query rows the effective rank is computed on: all of them, or an even spread."""
    m = max(1, min(n, budget // max(1, batch_heads * n)))
    if m == n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, m, dtype=torch.float64).round().long().unique()


def softmax_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: Grid | Layout,
                 masks: dict[str, MaskFn] | None = None, *,
                 chunk_elements: int = CHUNK_ELEMENTS,
                 erank_elements: int = ERANK_ELEMENTS) -> SoftmaxPass:
    """Softmax attention of ``q, k, v`` ``[B, H, N, d]`` and its statistics, streamed.

    Query rows go in chunks of ``chunk_elements // (B·H·N)`` (at least one): per chunk
    the probabilities ``P`` (float64) give the output rows, their entropy, their mass
    per squared grid distance and the mass on each mask's pairs. The rows of
    :func:`erank_sample` are kept for the effective rank. Nothing N×N is held.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, h, n, d = q.shape
    layout = grid if isinstance(grid, Layout) else Layout(tuple(grid))
    layout.check(n)
    masks = masks or {}
    scale = d ** -0.5
    rows = max(1, chunk_elements // max(1, b * h * n))
    sample = erank_sample(n, b * h, erank_elements).to(q.device)
    kept = torch.empty(b, h, len(sample), n, dtype=torch.float64, device=q.device)
    hist = torch.zeros(max_squared_distance(layout) + 1, dtype=torch.float64, device=q.device)
    text_mass = 0.0
    out = torch.empty_like(v)
    entropy = 0.0
    recall = dict.fromkeys(masks, 0.0)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        p = torch.softmax(torch.matmul(q[:, :, r0:r1], k.transpose(-1, -2)) * scale, dim=-1)
        out[:, :, r0:r1] = torch.matmul(p, v)
        entropy -= torch.special.xlogy(p, p).sum().item()
        d2 = squared_distances(layout, r0, r1, q.device)
        mass = p.sum((0, 1))
        on_grid = d2 >= 0
        hist.scatter_add_(0, d2.clamp_min(0).flatten(), (mass * on_grid).flatten())
        text_mass += mass[~on_grid].sum().item()
        for name, mask in masks.items():
            recall[name] += (p * mask(r0, r1)).sum().item()
        here = (sample >= r0) & (sample < r1)
        if here.any():
            kept[:, :, here] = p[:, :, sample[here] - r0]
    total_rows = b * h * n
    erank = effective_rank(kept).mean().item()
    return SoftmaxPass(
        out=out, entropy=entropy / total_rows,
        entropy_norm=entropy / total_rows / math.log(n) if n > 1 else 0.0,
        erank=erank, erank_rows=len(sample), locality=hist / total_rows,
        mass_recall={name: value / total_rows for name, value in recall.items()},
        text_mass=text_mass / total_rows,
    )


def mass_within(locality: torch.Tensor, radius: float) -> float:
    """Mass with ``dy² + dx² < radius²`` from a per-squared-distance histogram."""
    limit = math.ceil(radius * radius)
    return float(locality[: max(0, limit)].sum())


def radius_holding(locality: torch.Tensor, fraction: float) -> int:
    """The smallest integer radius whose window holds ``fraction`` of the mass."""
    radius = 1
    while mass_within(locality, radius) < fraction - 1e-12 and radius * radius <= len(locality):
        radius += 1
    return radius


# --------------------------------------------------------------------------- one layer


def layer_outputs(variant: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  grid: Grid | Layout, options: dict[str, Any], heads: int,
                  student_core=None) -> torch.Tensor:
    """What ``variant`` computes on the model's q, k, v: ``[B, N, C]`` float64 (module doc).

    ``student_core``: the converted student's attention core of this layer when the
    student inherits the model's projections there (it runs, in a float64 copy, on
    the reference path, with its learned parts as converted); ``None``: the method's
    ``attend`` operator. ``heads``: the student's count.
    """
    qs, ks, vs = (split_heads(t.double(), heads) for t in (q, k, v))
    where = {"layout": grid} if isinstance(grid, Layout) else {"grid": tuple(grid)}
    if student_core is not None:
        core = copy.deepcopy(student_core).double()
        core.impl = "reference"
        with torch.no_grad():
            return merge_heads(core(qs, ks, vs, **where))
    backend = attention.get(variant.method)
    return merge_heads(backend.attend(qs, ks, vs, impl="reference", **where,
                                      **backend.attend_options(options)))


def compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(‖out − ref‖ / ‖ref‖, cosine(out, ref))`` over every element, in float64."""
    out, ref = out.double().flatten(), ref.double().flatten()
    ref_norm = ref.norm().item()
    err = (out - ref).norm().item() / ref_norm if ref_norm else float("nan")
    denom = out.norm().item() * ref_norm
    cos = (out @ ref).item() / denom if denom else float("nan")
    return err, cos


# --------------------------------------------------------------------------- capture


@contextmanager
def on_each_layer(model, fn: Callable[[int, Any, torch.Tensor, Grid], None]) -> Iterator[None]:
    """Call ``fn(layer, mixer, x, grid)`` before every block's attention (forward pre-hooks).

    ``x`` is the mixer's input ``[B, N, C]``; the model's computation is unchanged.
    """
    handles = []
    for index, mixer in enumerate(model.mixers()):
        def hook(module, args, index=index):
            fn(index, module, args[0].detach(), tuple(args[1]))
        handles.append(mixer.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- the study


@dataclass
class GivenInputs:
    """Clean inputs from a file instead of the shapes world: ``x0`` ``[N, C, H, W]`` (the
    model's latents or pixels), class labels ``y`` ``[N]``, and where they came from."""

    x0: torch.Tensor
    y: torch.Tensor
    source: str


def load_inputs(path, config, num: int | None = None, flag: str = "--inputs") -> GivenInputs:
    """``x0`` (and ``y``) from a ``.safetensors``, ``.npz`` or ``.pt`` file, checked against
    the model's ``config``; the first ``num`` samples when given.

    Never unpickles: ``.npz`` loads with ``allow_pickle=False``, ``.pt`` with
    ``weights_only=True``. Without ``y`` every sample takes the null class (the label
    classifier-free guidance's unconditional half uses), when the model has one.
    """
    tensors, source = read_tensors(path, flag, "a .safetensors, .npz or .pt file holding "
                                               "x0 [N, C, H, W] and optionally y [N]")
    x0 = tensors.get("x0", tensors.get("latents"))
    if x0 is None:
        raise ValueError(f"{flag} {path}: holds {sorted(tensors) or 'nothing'}; it needs x0 "
                         "(or latents): the clean inputs [N, C, H, W]")
    c, p = config.in_channels, config.patch_size
    if x0.ndim != 4 or not x0.is_floating_point() or x0.shape[0] == 0:
        raise ValueError(f"{flag} {path}: x0 is {x0.dtype} of shape {tuple(x0.shape)}; it must "
                         f"be floating point [N, {c}, H, W] with N > 0")
    if x0.shape[1] != c or x0.shape[2] % p or x0.shape[3] % p:
        raise ValueError(f"{flag} {path}: x0 has shape {tuple(x0.shape)}; the model takes "
                         f"[N, {c}, H, W] with H and W multiples of its patch size {p}")
    if not torch.isfinite(x0).all():
        raise ValueError(f"{flag} {path}: x0 holds NaN or infinite values")
    y = tensors.get("y")
    if y is None:
        if config.label_rows == config.num_classes:
            raise ValueError(f"{flag} {path}: no labels y, and the model has no null class "
                             "(class_dropout_prob 0): store y [N] with the class labels")
        y = torch.full((x0.shape[0],), config.num_classes, dtype=torch.long)
    if y.shape != (x0.shape[0],) or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{flag} {path}: y is {y.dtype} of shape {tuple(y.shape)}; it must "
                         f"hold {x0.shape[0]} integer class labels (one per x0)")
    if y.numel() and not (0 <= int(y.min()) and int(y.max()) < config.label_rows):
        null = " and the null class" if config.label_rows > config.num_classes else ""
        raise ValueError(f"{flag} {path}: labels must lie in [0, {config.label_rows - 1}] "
                         f"(the model's {config.num_classes} classes{null})")
    if num is not None:
        if num > x0.shape[0]:
            raise ValueError(f"--num {num}: {path} holds {x0.shape[0]} samples")
        x0, y = x0[:num], y[:num]
    return GivenInputs(x0.float().contiguous(), y.long().contiguous(), source)


def read_tensors(path, flag: str, holds: str) -> tuple[dict[str, torch.Tensor], str]:
    """The named tensors of ``path`` (by its suffix, without unpickling anything) and
    ``"PATH (sha256 …)"``, from one read of the file. ``holds``: what the file should
    hold, for the error when there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file ({holds})")
    data = path.read_bytes()
    source = f"{path} (sha256 {hashlib.sha256(data).hexdigest()[:16]}…)"
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return dict(safetensors_load(data)), source
        if suffix == ".npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                return {k: torch.from_numpy(arrays[k].copy()) for k in arrays.files}, source
        if suffix in (".pt", ".pth"):
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict) or not all(
                    isinstance(v, torch.Tensor) for v in tensors.values()):
                raise ValueError("not a dict of tensors")
            return tensors, source
    except Exception as err:  # a damaged or foreign file: one line naming it
        raise ValueError(f"{flag} {path}: cannot read it as {suffix} tensors "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    raise ValueError(f"{flag} {path}: unknown suffix {suffix!r}; use .safetensors, .npz or .pt")


@dataclass
class FidelityConfig:
    """Everything ``fidelity`` needs besides the model (CLI flags map 1:1)."""

    variants: list[Variant]
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    num: int = 8
    seed: int = 0
    sample_steps: int = 20
    chunk_elements: int = CHUNK_ELEMENTS
    erank_elements: int = ERANK_ELEMENTS
    device: str = "cpu"
    #: clean inputs from a file (``--inputs``); None: ``num`` shapes-world images
    inputs: GivenInputs | None = None


@dataclass
class FidelityResult:
    """The long tables (lists of dicts) and one summary per variant."""

    layers: list[dict[str, Any]]
    end_to_end: list[dict[str, Any]]
    locality: list[dict[str, Any]]
    summaries: list[dict[str, Any]]
    students: dict[str, dict[str, Any]]  # per label: heads, computed, options, impl
    elapsed_s: float = 0.0


def shapes_inputs(config, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x0, y, noise)``: ``num`` shapes-world images and labels and fixed noise."""
    x0, y = ShapesWorld(config.input_size, seed=seed).get(range(num))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    return x0, y, noise


def check_timesteps(timesteps: Sequence[int], num_steps: int) -> tuple[int, ...]:
    bad = [t for t in timesteps if not 0 <= int(t) < num_steps]
    if bad or not timesteps:
        raise ValueError(f"--timesteps {list(timesteps)}: each must be an integer in "
                         f"[0, {num_steps - 1}] (the training schedule's steps)")
    return tuple(int(t) for t in timesteps)


def convert_variant(teacher, variant: Variant):
    """The converted student of ``variant`` (``attnbench.convert``, seed 0), in eval mode."""
    student, report = convert(teacher, variant.method, num_heads=variant.heads, seed=0,
                              **variant.options)
    return student.eval(), report


def inherits_layer(student, teacher, layer: int) -> bool:
    """Does the student's layer hold the teacher's q/k/v projection (same values)?"""
    s, t = student.blocks[layer].attn.qkv.weight, teacher.blocks[layer].attn.qkv.weight
    return s.shape == t.shape and torch.equal(s.detach().cpu(), t.detach().cpu())


@torch.no_grad()
def zero_shot_fidelity(teacher, config: FidelityConfig, *,
                       progress: bool = True) -> FidelityResult:
    """Run the whole measurement (module docstring) of ``config.variants`` on ``teacher``."""
    started = time.perf_counter()
    device = torch.device(config.device)
    teacher = teacher.to(device).eval()
    cfg = teacher.config
    diffusion = Diffusion(num_steps=1000)
    timesteps = check_timesteps(config.timesteps, diffusion.num_steps)
    if config.inputs is None:
        x0, y, noise = (t.to(device) for t in shapes_inputs(cfg, config.num, config.seed))
    else:
        x0, y = config.inputs.x0.to(device), config.inputs.y.to(device)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(config.seed))
        noise = noise.to(device)
    count = x0.shape[0]
    variants = with_softmax(list(config.variants))
    students, info = {}, {}
    for variant in variants:
        backend = attention.get(variant.method)
        student, _ = convert_variant(teacher, variant)
        students[variant.label] = student.to(device)
        heads = student.config.heads
        inherit = [inherits_layer(student, teacher, i) for i in range(cfg.depth)]
        info[variant.label] = {
            "method": variant.method, "heads": heads,
            "options": backend.resolve(variant.options, mixer=True),
            "computed": "converted layer" if all(inherit) else
                        "operator (attend) on the model's q, k, v: projections re-initialised "
                        "at conversion, learned parts left out",
            "inherits": inherit,
        }
    teacher64 = copy.deepcopy(teacher).double()
    depth = cfg.depth
    bar = _progress(len(timesteps) * depth + len(variants), progress)
    layers, locality, e2e = [], [], []

    for t in timesteps:
        tt = torch.full((count,), t, dtype=torch.long, device=device)
        xt = diffusion.q_sample(x0, tt, noise)

        def analyse(layer: int, mixer, x: torch.Tensor, grid: Grid, t=t) -> None:
            q, k, v = mixer.split_heads(x.double())
            cores = {label: students[label].blocks[layer].attn.core
                     if info[label]["inherits"][layer] else None for label in students}
            rows, curve = analyse_layer(q, k, v, grid, variants, info, cores, layer=layer,
                                        timestep=t, config=config)
            layers.extend(rows)
            locality.extend(curve)
            bar.update(1)
            bar.set_postfix_str(f"t={t} layer {layer}")

        with on_each_layer(teacher64, analyse):
            teacher64(xt.double(), tt, y)
        eps_t = teacher(xt, tt, y)[:, : cfg.in_channels]
        for variant in variants:
            eps_s = students[variant.label](xt, tt, y)[:, : cfg.in_channels]
            e2e.append(end_to_end_row(variant, t, eps_s, eps_t))

    shape = tuple(x0.shape)
    steps = f"ddim{config.sample_steps}"
    clip = cfg.is_pixel

    def trajectory(model) -> torch.Tensor:
        return diffusion.sample(model, shape, y, steps=steps, sampler="ddim",
                                clip_denoised=clip, noise=noise, device=device)

    reference = trajectory(teacher)
    psnrs = {}
    for variant in variants:
        label = variant.label
        images = reference if label == "softmax" else trajectory(students[label])
        psnrs[label] = psnr(images, reference).mean().item()
        bar.update(1)
        bar.set_postfix_str(f"trajectory {label}")
    bar.close()
    for data in info.values():
        data.pop("inherits")
    return FidelityResult(layers, e2e, locality, summarise(variants, info, layers, e2e, psnrs),
                          info, elapsed_s=time.perf_counter() - started)


def analyse_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: Grid | Layout,
                  variants: list[Variant], info: dict[str, dict[str, Any]],
                  cores: dict[str, Any], *, layer: int, timestep: int,
                  config: FidelityConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows of one layer at one timestep: one per variant, and the locality curve.

    ``q, k, v`` ``[B, H, N, d]`` are the model's (float64), ``geometry`` their grid or
    layout; ``info[label]`` holds the variant's resolved ``options`` and ``heads``;
    ``cores[label]`` the converted student's core at this layer, or None (module doc).
    """
    masks, notes = {}, {}
    for variant in variants:
        mask, notes[variant.label] = exact_pairs(variant, q, k, geometry,
                                                 info[variant.label]["options"])
        if mask is not None:
            masks[variant.label] = mask
    sm = softmax_pass(q, k, v, geometry, masks, chunk_elements=config.chunk_elements,
                      erank_elements=config.erank_elements)
    ref = merge_heads(sm.out)
    on_grid = sm.locality / sm.locality.sum().clamp_min(1e-300)  # of the image-pair mass
    stats = {"entropy": sm.entropy, "entropy_norm": sm.entropy_norm,
             "erank": sm.erank, "erank_rows": sm.erank_rows,
             "radius_50": radius_holding(on_grid, 0.5),
             "radius_90": radius_holding(on_grid, 0.9), "text_mass": sm.text_mass}
    rows = []
    for variant in variants:
        label = variant.label
        core = cores.get(label)
        out = layer_outputs(variant, q, k, v, geometry, info[label]["options"],
                            info[label]["heads"], core)
        err, cos = compare(out, ref)
        rows.append({
            "method": variant.method, "options": _options_text(variant),
            "label": label, "layer": layer, "timestep": timestep, "rel_error": err,
            "cosine": cos, "mass_recall": sm.mass_recall.get(label, float("nan")),
            "mass_recall_note": notes[label],
            "computed": "converted layer" if core is not None else "operator",
            **stats,
        })
    radius_max = math.isqrt(len(sm.locality) - 1) + 1
    curve = [{"layer": layer, "timestep": timestep, "radius": radius,
              "mass_within": mass_within(sm.locality, radius)}
             for radius in range(1, radius_max + 1)]
    return rows, curve


def end_to_end_row(variant: Variant, timestep: int, out: torch.Tensor,
                   ref: torch.Tensor) -> dict[str, Any]:
    """The student's prediction against the model's on the same input, at ``timestep``."""
    err, _ = compare(out, ref)
    return {"method": variant.method, "options": _options_text(variant),
            "label": variant.label, "timestep": timestep, "eps_rel_error": err,
            "eps_mse": ((out.double() - ref.double()) ** 2).mean().item()}


def summarise(variants: list[Variant], info: dict[str, dict[str, Any]],
              layers: list[dict[str, Any]], e2e: list[dict[str, Any]],
              psnrs: dict[str, float]) -> list[dict[str, Any]]:
    """One summary per variant: the means over layers and timesteps, and the PSNR."""
    summaries = []
    for variant in variants:
        label = variant.label
        rows = [r for r in layers if r["label"] == label]
        ends = [r for r in e2e if r["label"] == label]
        summaries.append({
            "method": variant.method, "options": _options_text(variant), "label": label,
            "heads": info[label]["heads"], "computed": info[label]["computed"],
            "rel_error": _mean(r["rel_error"] for r in rows),
            "cosine": _mean(r["cosine"] for r in rows),
            "mass_recall": _mean(r["mass_recall"] for r in rows),
            "mass_recall_note": rows[0]["mass_recall_note"] if rows else "",
            "eps_rel_error": _mean(r["eps_rel_error"] for r in ends),
            "eps_mse": _mean(r["eps_mse"] for r in ends),
            "psnr_trajectory": psnrs.get(label, float("nan")),
        })
    return summaries


def _options_text(variant: Variant) -> str:
    return ":".join(variant.label.split(":")[1:])


def _mean(values) -> float:
    values = [float(v) for v in values]
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite and len(finite) == len(values) else float("nan")


def _progress(total: int, enabled: bool):
    return tqdm(total=total, desc="zero-shot", unit="layer", disable=not enabled)
