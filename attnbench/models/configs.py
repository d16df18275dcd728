"""DiT configurations: the :class:`DiTConfig` dataclass and the named model zoo.

The zoo holds the twelve configurations of the DiT paper (S, B, L, XL × patch 2,
4, 8, with the heads of facebookresearch/DiT's ``models.py``) and two small
ones of this project:

* ``DiT-T/2``, ``DiT-T/4`` -- tiny (depth 2, hidden 64, 4 heads, 10 classes,
  64-px images): for tests, a forward pass takes milliseconds.
* ``DiT-Ti/2``, ``DiT-Ti/4`` -- DeiT-Ti sized (depth 12, hidden 192, 3 heads,
  1000 classes): :data:`CPU_DEFAULT`, the model CPU-only runs use by default.

A config also records the attention of its blocks -- the registered method,
its mixer options and its number of heads -- so a converted student saves and
reloads with the right mixers. ``num_heads`` is always the heads of the DiT
architecture (the softmax teacher); ``attention_heads`` those of the mixers when
a conversion changed them (LiT's "few heads").
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..common.names import closest

#: latent channels of the SD VAE the DiT checkpoints were trained in (image / 8)
LATENT_CHANNELS = 4
#: the VAE's down-sampling factor: a 256-px image is a 32×32 latent
VAE_DOWNSAMPLE = 8


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to build a :class:`~attnbench.models.dit.DiT`.

    ``input_size`` is the latent side the stored ``pos_embed`` is built for
    (32 for a 256-px checkpoint); the model runs at any size divisible by
    ``patch_size`` regardless. ``num_classes`` counts real classes: the label
    table has one more row, the null class of classifier-free guidance, when
    ``class_dropout_prob > 0`` (as in every DiT checkpoint).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = LATENT_CHANNELS
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    #: the registered attention method of every block and its mixer options
    attention: str = "softmax"
    attention_options: dict[str, Any] = field(default_factory=dict)
    #: heads of the attention mixers; ``None`` = ``num_heads``
    attention_heads: int | None = None
    #: the zoo name this config came from, if any (informative only)
    name: str | None = None

    def __post_init__(self) -> None:
        for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                    "num_heads", "num_classes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DiTConfig.{key} must be a positive integer, got {value!r}")
        if self.attention_heads is not None and (
            isinstance(self.attention_heads, bool)
            or not isinstance(self.attention_heads, int)
            or self.attention_heads <= 0
        ):
            raise ValueError(
                f"DiTConfig.attention_heads must be a positive integer or None, "
                f"got {self.attention_heads!r}"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by 4 "
                "(the 2D sin-cos position embedding splits it in four)"
            )
        for key in ("num_heads", "attention_heads"):
            heads = getattr(self, key)
            if heads is not None and self.hidden_size % heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by {key}={heads}"
                )
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}"
            )
        if (
            isinstance(self.mlp_ratio, bool)
            or not isinstance(self.mlp_ratio, int | float)
            or self.mlp_ratio <= 0
        ):
            raise ValueError(f"DiTConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if int(self.hidden_size * self.mlp_ratio) <= 0:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} leaves no MLP hidden units")
        if (
            isinstance(self.class_dropout_prob, bool)
            or not isinstance(self.class_dropout_prob, int | float)
            or not 0 <= self.class_dropout_prob < 1
        ):
            raise ValueError(
                f"class_dropout_prob must lie in [0, 1), got {self.class_dropout_prob!r}"
            )
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"DiTConfig.learn_sigma must be a bool, got {self.learn_sigma!r}")
        if not isinstance(self.attention, str) or not self.attention:
            raise ValueError(f"DiTConfig.attention must be a method name, got {self.attention!r}")
        if not isinstance(self.attention_options, dict):
            raise ValueError(
                f"DiTConfig.attention_options must be a dict, got {self.attention_options!r}"
            )

    def __hash__(self) -> int:  # attention_options is a dict: hash the canonical JSON
        return hash(self.to_json())

    # ----- derived --------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        """ε (and, with ``learn_sigma``, the variance interpolation v): 2C or C channels."""
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def is_pixel(self) -> bool:
        """3 channels = RGB pixels in [-1, 1] (samplers clip x̂_0); anything else a VAE latent."""
        return self.in_channels == 3

    @property
    def heads(self) -> int:
        """Heads of the attention mixers (``attention_heads`` or ``num_heads``)."""
        return self.attention_heads or self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid the stored ``pos_embed`` is built for."""
        side = self.input_size // self.patch_size
        return side, side

    @property
    def label_rows(self) -> int:
        """Rows of ``y_embedder.embedding_table`` (+1 for the CFG null class)."""
        return self.num_classes + (1 if self.class_dropout_prob > 0 else 0)

    @property
    def image_size(self) -> int:
        """Pixel side of the images the stored ``pos_embed`` matches (SD VAE: ×8)."""
        return self.input_size * VAE_DOWNSAMPLE

    # ----- (de)serialisation ------------------------------------------------------------
    def replace(self, **changes: Any) -> DiTConfig:
        """A copy with ``changes``; unknown field names raise ValueError."""
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise ValueError(
                f"unknown DiTConfig field(s) {unknown}; valid: {', '.join(field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``from_dict`` inverts it)."""
        data = dataclasses.asdict(self)
        data["attention_options"] = dict(self.attention_options)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> DiTConfig:
        """Rebuild a config from ``to_dict``'s output; untrusted input is validated."""
        if not isinstance(data, dict):
            raise ValueError(f"a DiT config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(field_names()))
        if unknown:
            raise ValueError(
                f"unknown DiTConfig field(s) {unknown}; valid: {', '.join(field_names())}"
            )
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"invalid DiT config: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(DiTConfig)]


# --------------------------------------------------------------------------- the zoo

#: (depth, hidden, heads) of each DiT size, from facebookresearch/DiT models.py
SIZES: dict[str, tuple[int, int, int]] = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}

DIT_CONFIGS: dict[str, DiTConfig] = {}
for _size, (_depth, _hidden, _heads) in SIZES.items():
    for _patch in (2, 4, 8):
        _name = f"DiT-{_size}/{_patch}"
        DIT_CONFIGS[_name] = DiTConfig(
            depth=_depth, hidden_size=_hidden, num_heads=_heads, patch_size=_patch, name=_name
        )
for _patch in (2, 4):
    _name = f"DiT-Ti/{_patch}"
    DIT_CONFIGS[_name] = DiTConfig(
        depth=12, hidden_size=192, num_heads=3, patch_size=_patch, name=_name
    )
    _name = f"DiT-T/{_patch}"
    DIT_CONFIGS[_name] = DiTConfig(
        input_size=8, depth=2, hidden_size=64, num_heads=4, num_classes=10,
        patch_size=_patch, name=_name,
    )

#: the model CPU-only runs use by default, and the one unit tests use
CPU_DEFAULT = "DiT-Ti/2"
TEST_MODEL = "DiT-T/2"

_NAME = re.compile(r"^dit-([a-z]+)[/-](\d+)$", re.IGNORECASE)


def config_names() -> list[str]:
    """Every zoo name, paper sizes first."""
    return list(DIT_CONFIGS)


def get_config(name: str | DiTConfig, **overrides: Any) -> DiTConfig:
    """The zoo config ``name`` (``"DiT-XL/2"``; ``"DiT-XL-2"`` works too) with overrides."""
    if isinstance(name, DiTConfig):
        return name.replace(**overrides) if overrides else name
    match = _NAME.match(str(name).strip())
    key = None
    if match:
        size, patch = match.groups()
        key = next((n for n in DIT_CONFIGS if n.lower() == f"dit-{size}/{patch}".lower()), None)
    if key is None:
        raise ValueError(f"unknown DiT config {name!r}" + closest(str(name), config_names()))
    config = DIT_CONFIGS[key]
    return config.replace(**overrides) if overrides else config


def zoo_heads(hidden_size: int, depth: int) -> tuple[str, int] | None:
    """``(size, heads)`` of the zoo size with this hidden size and depth, if any.

    Heads cannot be read from a checkpoint's tensor shapes (q/k/v is one C→3C
    Linear whatever the split); the zoo is where they come from.
    """
    for name, config in DIT_CONFIGS.items():
        if config.hidden_size == hidden_size and config.depth == depth:
            return name.split("/")[0], config.num_heads
    return None
