"""Conversion = weight inheritance: a pretrained DiT becomes a student of any method.

``convert(model, method, **options)`` builds the same DiT with every block's
attention replaced by ``method``'s mixer, copies every parameter the recipe
inherits, lets the method initialise the rest, and returns the student with an
:class:`InheritanceReport` saying what happened to every key.

What is inherited is decided from the mixers' own declarations, never from the
method's name: a mixer's ``inheritable_parameters()`` (the q/k/v/out
projections) have a softmax counterpart, its ``new_parameters()`` (those of its
``core``) do not and are initialised by the core's ``reset_new_parameters()``.
The recipe -- whether the projections are inherited or re-initialised, and how
many heads the student has, with its source -- is declared by the method as
data (``backend.conversion_recipe``, an :class:`attnbench.attention.recipes.
ConversionRecipe`); this module has no per-method rule. A method without one
gets ``inherit``: every parameter with a counterpart, the teacher's heads.

Every recipe is overridable: ``recipe=`` (another method's name or a
``ConversionRecipe``), ``num_heads=``, ``inherit_projections=``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import attention
from ..attention.recipes import ConversionRecipe
from ..common.names import closest
from ..common.versions import versions
from .checkpoint import CheckpointInfo, load_dit, save_dit
from .configs import DiTConfig
from .dit import DiT

#: file name of the report beside a saved student
REPORT_FILE = "inheritance.json"


# --------------------------------------------------------------------------- recipes

#: the recipe of a method that declares none
INHERIT = ConversionRecipe(
    "inherit",
    "inherit every parameter with a softmax counterpart (the projections); the method "
    "initialises its new parameters; teacher's heads",
    "attnbench's default",
)

#: the name older code used
Recipe = ConversionRecipe


def recipe_names() -> list[str]:
    """``inherit`` and every registered method that declares a conversion recipe."""
    return ["inherit", *(n for n in attention.names() if attention.get(n).conversion_recipe)]


def get_recipe(name: str) -> ConversionRecipe:
    """The conversion recipe called ``name``: ``inherit`` or a method's own."""
    if name == "inherit":
        return INHERIT
    if name in attention.names() and attention.get(name).conversion_recipe:
        return attention.get(name).conversion_recipe
    raise ValueError(f"unknown conversion recipe {name!r}{closest(name, recipe_names())}")


def recipe_for(method: str) -> ConversionRecipe:
    """The default recipe of ``method``: its own if it declares one, else ``inherit``."""
    return attention.get(method).conversion_recipe or INHERIT


def lit_heads(teacher: DiTConfig) -> int:
    """LiT's few heads for ``teacher`` (the rule is LiT's: ``attention.lit.lit_heads``)."""
    return get_recipe("lit").student_heads(teacher.num_heads, teacher.hidden_size)


# --------------------------------------------------------------------------- the report


@dataclass
class InheritanceReport:
    """What a conversion did with every key of the teacher and of the student.

    * ``inherited`` -- student keys copied from the teacher key of the same name;
    * ``new`` -- student keys with no softmax counterpart (the method's own
      parameters), initialised as the method prescribes;
    * ``reinitialised`` -- student keys that have a teacher counterpart the recipe
      chose not to inherit (LiT's q/k/v/proj), freshly initialised;
    * ``dropped`` -- teacher keys whose values are not in the student.

    ``inherited + dropped`` = the teacher's keys and ``inherited + new +
    reinitialised`` = the student's keys, each exactly once.
    """

    method: str
    options: dict[str, Any]
    recipe: str
    recipe_summary: str
    recipe_source: str
    inherit_projections: bool
    teacher_heads: int
    student_heads: int
    inherited: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    #: element counts: teacher, student, inherited, new, reinitialised, dropped
    parameters: dict[str, int] = field(default_factory=dict)
    teacher_config: dict[str, Any] = field(default_factory=dict)
    student_config: dict[str, Any] = field(default_factory=dict)
    #: the teacher's checkpoint (path, format, entry, size, sha256) if it came from a file
    source: dict[str, Any] | None = None
    seed: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    #: what a user should know before training this student (printed by the CLIs)
    warnings: list[str] = field(default_factory=list)
    #: the method's distillation recipe (``backend.distill_recipe``) and its source, so
    #: the student's folder says how it is meant to be trained and on whose authority
    distill_recipe: str = ""
    distill_recipe_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> InheritanceReport:
        data = json.loads(Path(path).read_text())
        return cls(**data)

    def summary(self) -> str:
        """A few human-readable lines."""
        p = self.parameters
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items()) or "defaults"
        src = f" from {self.source['path']}" if self.source else ""
        lines = [
            f"converted{src} to {self.method} ({opts}) with recipe {self.recipe!r}: "
            f"{self.teacher_heads} -> {self.student_heads} heads, projections "
            + ("inherited" if self.inherit_projections else "re-initialised"),
            f"  inherited     {len(self.inherited):5d} keys {p.get('inherited', 0):>13,d} params",
            f"  new           {len(self.new):5d} keys {p.get('new', 0):>13,d} params",
            f"  reinitialised {len(self.reinitialised):5d} keys "
            f"{p.get('reinitialised', 0):>13,d} params",
            f"  dropped       {len(self.dropped):5d} keys {p.get('dropped', 0):>13,d} params"
            " (teacher values not used)",
            f"  student total {p.get('student', 0):,d} params (teacher {p.get('teacher', 0):,d})",
            *(f"warning: {w}" for w in self.warnings),
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------- convert


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ConversionPlan:
    """What a conversion will build, decided from the arguments before any tensor moves."""

    method: str
    backend: Any  # the method's AttentionBackend
    recipe: ConversionRecipe
    heads: int
    inherit: bool
    resolved: dict[str, Any]  # the method's options after its defaults
    attention_options: dict[str, Any]  # ``resolved`` plus ``impl`` when one was given
    student_config: DiTConfig


def plan_conversion(teacher_config: DiTConfig, method: str, *,
                    recipe: str | Recipe | None = None, num_heads: int | None = None,
                    inherit_projections: bool | None = None,
                    **options: Any) -> ConversionPlan:
    """The student's method, recipe, heads and config; ``ValueError`` naming a bad argument."""
    backend = attention.get(method)
    rec = get_recipe(recipe) if isinstance(recipe, str) else (recipe or recipe_for(method))
    t_cfg = teacher_config
    heads = rec.student_heads(t_cfg.num_heads, t_cfg.hidden_size) if num_heads is None \
        else num_heads
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"num_heads must be a positive integer, got {heads!r}")
    if t_cfg.hidden_size % heads:
        raise ValueError(
            f"num_heads={heads} does not divide the hidden size {t_cfg.hidden_size}; "
            f"choose one of {_divisors(t_cfg.hidden_size)}"
        )
    inherit = rec.inherit_projections if inherit_projections is None \
        else bool(inherit_projections)

    impl = options.pop("impl", None)
    if impl is not None and impl not in ("auto", *backend.paths()):
        raise ValueError(
            f"{method}: unknown implementation {impl!r}; valid: auto, {', '.join(backend.paths())}"
        )
    resolved = backend.resolve(options, mixer=True)
    attention_options = {**resolved, **({"impl": impl} if impl is not None else {})}
    s_cfg = t_cfg.replace(
        attention=method,
        attention_options=attention_options,
        attention_heads=None if heads == t_cfg.num_heads else heads,
    )
    return ConversionPlan(method, backend, rec, heads, inherit, resolved, attention_options,
                          s_cfg)


def _attention_keys(student: DiT, teacher: DiT, t_state: dict[str, torch.Tensor],
                    s_state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Every attention tensor of the student: ``"inheritable"`` (the teacher's mixer has the
    same parameter, same shape) or ``"new"``."""
    attn_keys: dict[str, str] = {}
    for i, (s_mix, t_mix) in enumerate(zip(student.mixers(), teacher.mixers(), strict=True)):
        prefix = f"blocks.{i}.attn."
        s_inh = set(s_mix.inheritable_parameters())
        t_inh = set(t_mix.inheritable_parameters())
        for name in s_mix.state_dict():
            key = prefix + name
            counterpart = (
                name in s_inh
                and name in t_inh
                and key in t_state
                and t_state[key].shape == s_state[key].shape
            )
            attn_keys[key] = "inheritable" if counterpart else "new"
    return attn_keys


def _split_keys(student: DiT, teacher: DiT, t_state: dict[str, torch.Tensor],
                s_state: dict[str, torch.Tensor],
                inherit: bool) -> tuple[list[str], list[str], list[str], list[str]]:
    """``(inherited, new, reinitialised, dropped)`` state-dict keys of the conversion."""
    attn_keys = _attention_keys(student, teacher, t_state, s_state)
    inherited, new, reinitialised = [], [], []
    for key, value in s_state.items():
        kind = attn_keys.get(key)
        if kind == "new":
            new.append(key)
        elif kind == "inheritable":
            (inherited if inherit else reinitialised).append(key)
        elif key in t_state and t_state[key].shape == value.shape:
            inherited.append(key)
        else:  # pragma: no cover - same config outside the attention: cannot happen
            raise ValueError(f"the teacher has no tensor for {key} of shape {tuple(value.shape)}")
    taken = set(inherited)
    dropped = [k for k in t_state if k not in taken]
    return inherited, new, reinitialised, dropped


def convert(
    model: DiT | str | Path,
    method: str,
    *,
    recipe: str | Recipe | None = None,
    num_heads: int | None = None,
    inherit_projections: bool | None = None,
    seed: int | None = 0,
    hash_source: bool = True,
    **options: Any,
) -> tuple[DiT, InheritanceReport]:
    """Convert ``model`` (a DiT, or a checkpoint path) to attention ``method``.

    ``options`` are the method's (mixer) options, ``impl=`` included; ``recipe``,
    ``num_heads`` and ``inherit_projections`` override the method's recipe.
    ``seed`` fixes the initialisation of what is not inherited (the global RNG is
    left untouched). Returns ``(student, report)``; the student is on the
    teacher's device and dtype, in its train/eval mode.
    """
    teacher = load_dit(model) if isinstance(model, str | Path) else model
    if not isinstance(teacher, DiT):
        raise ValueError(f"convert() takes an attnbench DiT or a checkpoint path, got {model!r}")
    plan = plan_conversion(teacher.config, method, recipe=recipe, num_heads=num_heads,
                           inherit_projections=inherit_projections, **options)

    param = next(teacher.parameters())
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        student = DiT(plan.student_config)  # DiT's init, then every mixer's reset_new_parameters()

    t_state = teacher.state_dict()
    s_state = student.state_dict()
    inherited, new, reinitialised, dropped = _split_keys(student, teacher, t_state, s_state,
                                                         plan.inherit)
    with torch.no_grad():
        student.load_state_dict({k: t_state[k] for k in inherited}, strict=False)
    student = student.to(device=param.device, dtype=param.dtype)
    student.train(teacher.training)

    def count(keys, state):
        return int(sum(state[k].numel() for k in keys))

    info: CheckpointInfo | None = getattr(teacher, "checkpoint", None)
    t_cfg, rec, backend = teacher.config, plan.recipe, plan.backend
    report = InheritanceReport(
        method=method,
        options=plan.attention_options,
        recipe=rec.name,
        recipe_summary=rec.summary,
        recipe_source=rec.source,
        inherit_projections=plan.inherit,
        teacher_heads=t_cfg.heads,
        student_heads=plan.heads,
        inherited=inherited,
        new=new,
        reinitialised=reinitialised,
        dropped=dropped,
        parameters={
            "teacher": count(t_state, t_state),
            "student": count(s_state, s_state),
            "inherited": count(inherited, s_state),
            "new": count(new, s_state),
            "reinitialised": count(reinitialised, s_state),
            "dropped": count(dropped, t_state),
        },
        teacher_config=t_cfg.to_dict(),
        student_config=plan.student_config.to_dict(),
        source=None if info is None else info.to_dict(with_hash=hash_source),
        seed=seed,
        versions=versions(),
        warnings=_dense_warning(backend, plan.resolved, t_cfg, plan.heads),
        distill_recipe=backend.distill_recipe.describe() if backend.distill_recipe else "",
        distill_recipe_source=backend.distill_recipe.source if backend.distill_recipe else "",
    )
    student.inheritance = report
    return student, report


def _dense_warning(backend, options: dict[str, Any], cfg: DiTConfig, heads: int) -> list[str]:
    """A warning when ``method`` with ``options`` is exactly softmax at the model's own grid.

    Sparse methods' defaults are sized for DiT-XL at 256-1024 px: CLEAR's r=8 or SLA's
    64-token blocks cover a small model's whole token grid, and the "student" then
    computes exactly the teacher's attention -- a conversion that measures nothing. A
    float64 probe on random inputs at the native grid says so before minutes of training.
    """
    side = cfg.input_size // cfg.patch_size
    n, d = side * side, cfg.hidden_size // heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    try:
        out = backend.attend(q, k, v, grid=(side, side), impl="reference",
                             **backend.attend_options(options))
    except (ValueError, NotImplementedError):
        return []
    exact = attention.get("softmax").attend(q, k, v, grid=(side, side), impl="reference")
    shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "its defaults"
    if torch.allclose(out, exact, rtol=1e-9, atol=1e-9):
        what = "is exactly softmax attention"
    elif backend.sparse_pairs and backend.density(
            (side, side), **backend.attend_options(options)) >= 1.0:
        # SLA with its linear branch over all tokens: the sparse part is all of softmax
        what = "computes every query–key pair exactly (plus its linear branch)"
    else:
        return []
    return [f"{backend.name} with {shown} {what} on this model's "
            f"{side}×{side} token grid: the student computes what the teacher does. "
            f"Choose options that are sparse at this grid (python -m attnbench list)."]


def save_student(student: DiT, out: str | Path, report: InheritanceReport | None = None) -> Path:
    """Save a converted student to directory ``out`` (weights, config, report JSON)."""
    out = Path(out)
    weights = save_dit(student, out)
    report = report or getattr(student, "inheritance", None)
    if report is not None:
        report.save(weights.parent / REPORT_FILE)
    return weights
