"""DiT: a Diffusion Transformer whose attention is any registered method.

The architecture and the state-dict layout are those of facebookresearch/DiT
(Peebles & Xie, "Scalable Diffusion Models with Transformers"), so the released
checkpoints (``DiT-XL-2-256x256.pt``, ...) load unchanged:

    pos_embed                                   [1, T, D]  fixed 2D sin-cos
    x_embedder.proj.{weight,bias}               patch embedding (a strided conv)
    t_embedder.mlp.{0,2}.{weight,bias}          timestep MLP
    y_embedder.embedding_table.weight           [classes + 1, D] (+1: CFG null class)
    blocks.{i}.attn.qkv.{weight,bias}           the attention's projections ...
    blocks.{i}.attn.proj.{weight,bias}          ... (plus a method's own parameters)
    blocks.{i}.mlp.fc{1,2}.{weight,bias}
    blocks.{i}.adaLN_modulation.1.{weight,bias}
    final_layer.linear.{weight,bias}
    final_layer.adaLN_modulation.1.{weight,bias}

Two differences from the original, neither visible in a checkpoint:

* the attention of every block is the mixer of a registered method
  (``attnbench.attention``), handed the token grid; the model never asks which;
* any resolution runs: the fixed sin-cos position embedding is recomputed (and
  cached) for the token grid of the input when it differs from the stored one,
  so a 256-px checkpoint runs at 512 … 8192 px.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from .. import attention
from ..attention.inputs import Grid
from ..attention.module import AttentionMixer
from .configs import DiTConfig, get_config

#: recomputed position embeddings kept per model (grid × device × dtype)
POS_EMBED_CACHE_SIZE = 4


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x·(1 + scale) + shift``, per sample, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------- position


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[sin(p·ω), cos(p·ω)]`` with ``ω_k = 10000^(-k/(dim/2))``, in float64."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed(
    dim: int,
    grid: Grid,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The fixed 2D sin-cos position embedding of DiT (MAE's), ``[Hg·Wg, dim]``.

    Tokens are row-major. As in the original, the first half of the channels
    encodes a token's column and the second half its row, each half a 1D sin-cos
    embedding. The per-axis tables are computed in float64 (as the original
    does with numpy), then cast, so large grids cost no float64 N×D buffer.
    """
    if dim % 4:
        raise ValueError(f"the 2D sin-cos embedding needs dim divisible by 4, got {dim}")
    hg, wg = grid
    cols = _sincos_1d(dim // 2, torch.arange(wg)).to(device=device, dtype=dtype)  # [W, D/2]
    rows = _sincos_1d(dim // 2, torch.arange(hg)).to(device=device, dtype=dtype)  # [H, D/2]
    emb = torch.cat(
        [cols[None].expand(hg, wg, dim // 2), rows[:, None].expand(hg, wg, dim // 2)], dim=-1
    )
    return emb.reshape(hg * wg, dim)


# --------------------------------------------------------------------------- embedders


class PatchEmbed(nn.Module):
    """Image/latent ``[B, C, H, W]`` → tokens ``[B, (H/p)·(W/p), D]`` by a strided conv.

    The ``proj`` conv has timm's ``PatchEmbed`` name (``x_embedder.proj.*``);
    unlike timm's, any ``H, W`` divisible by ``p`` is accepted, and the token
    grid is returned with the tokens.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.proj = nn.Conv2d(
            in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected latents [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}"
            )
        p = self.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            raise ValueError(
                f"latent size {h}x{w} is not divisible by the patch size {p}: "
                f"use a multiple of {p} (an image side multiple of {8 * p} px with the SD VAE)"
            )
        x = self.proj(x)  # [B, D, H/p, W/p]
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class TimestepEmbedder(nn.Module):
    """Scalar timesteps → ``[B, D]``: sinusoidal frequencies, then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """``[cos(t·f), sin(t·f)]``, ``f_k = max_period^(-k/(dim/2))`` (GLIDE's), float32."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels → ``[B, D]``, with label dropout for classifier-free guidance.

    With ``dropout_prob > 0`` the table has an extra last row, the "null" class
    (label ``num_classes``) that the unconditional half of CFG uses.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(
        self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Replace dropped labels by the null class (randomly, or where ``force_drop_ids == 1``)."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# --------------------------------------------------------------------------- blocks


class Mlp(nn.Module):
    """The block's feed-forward: ``fc1`` → tanh-GELU → ``fc2`` (timm's ``Mlp`` names)."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning; ``attn`` is a registered method's mixer.

    ``x += gate_msa·attn(modulate(LN(x)))``, then the same for the MLP; the six
    shift/scale/gate vectors come from the conditioning ``c`` (timestep + label)
    through ``adaLN_modulation`` (zero-initialised: a fresh block is the identity).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attention_method: str = "softmax",
        attention_options: dict | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        backend = attention.get(attention_method)
        self.attn: AttentionMixer = backend.mixer(
            hidden_size, num_heads, **dict(attention_options or {})
        )
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: Grid) -> torch.Tensor:
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * self.attn(h, grid)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a Linear to ``p·p·out_channels`` per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------- the model


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone (class-conditional, ε-prediction).

    ``forward(x, t, y)``: latents ``[B, C, H, W]`` (any ``H, W`` divisible by the
    patch size), timesteps ``[B]``, labels ``[B]`` (``num_classes`` = the null
    class) → ``[B, out_channels, H, W]`` (ε, then the variance interpolation v
    with ``learn_sigma``). ``config`` says everything the model is, attention
    included; ``build_dit`` / ``load_dit`` are the usual ways to get one.
    """

    def __init__(self, config: DiTConfig | None = None, *, initialize: bool = True) -> None:
        super().__init__()
        config = config or DiTConfig()
        self.config = config
        self.learn_sigma = config.learn_sigma
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.heads

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(
            config.num_classes, config.hidden_size, config.class_dropout_prob
        )
        hg, wg = config.grid
        # The fixed sin-cos embedding of the stored grid, kept under DiT's key (a frozen
        # Parameter, as in the original) so official checkpoints load unchanged.
        self.pos_embed = nn.Parameter(
            torch.zeros(1, hg * wg, config.hidden_size), requires_grad=False
        )
        self.blocks = nn.ModuleList(
            DiTBlock(
                config.hidden_size,
                config.heads,
                mlp_ratio=config.mlp_ratio,
                attention_method=config.attention,
                attention_options=config.attention_options,
            )
            for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, self.out_channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        #: where the weights came from (set by ``load_dit``) and, for a converted
        #: student, its ``InheritanceReport`` (set by ``convert``)
        self.checkpoint = None
        self.inheritance = None
        if initialize:
            self.initialize_weights()

    # ----- init ------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation, then each mixer's own init of its new parameters.

        Xavier-uniform for every Linear (bias 0) and for the patch embedding seen
        as a Linear; N(0, 0.02) for the label table and the timestep MLP; zero for
        the adaLN modulations and the final linear (adaLN-Zero). The mixers'
        ``reset_new_parameters()`` runs last so a method's prescribed init (e.g. a
        zero-initialised branch) is not overwritten by the Xavier pass.
        """

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        self.pos_embed.copy_(
            sincos_pos_embed(self.config.hidden_size, self.config.grid, dtype=self.pos_embed.dtype)
            .to(self.pos_embed.device)
            .unsqueeze(0)
        )
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # its bias keeps Conv2d's default
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        for mixer in self.mixers():
            mixer.reset_new_parameters()
        self._pos_cache.clear()

    # ----- helpers ---------------------------------------------------------------------
    def mixers(self) -> Iterator[AttentionMixer]:
        """The attention mixer of every block, in order."""
        return (block.attn for block in self.blocks)

    def pos_embed_for(self, grid: Grid) -> torch.Tensor:
        """``[1, Hg·Wg, D]`` for ``grid``: the stored embedding, or a recomputed one.

        A grid other than the stored one (another resolution, a non-square image)
        gets the same sin-cos formula evaluated on its grid, cached per
        grid/device/dtype (the last few only: sweeps visit many sizes).
        """
        grid = (int(grid[0]), int(grid[1]))
        stored = self.pos_embed
        if grid == self.config.grid and stored.shape[1] == grid[0] * grid[1]:
            return stored
        key = (grid, stored.device, stored.dtype)
        cached = self._pos_cache.get(key)
        if cached is None:
            while len(self._pos_cache) >= POS_EMBED_CACHE_SIZE:
                self._pos_cache.pop(next(iter(self._pos_cache)))
            cached = sincos_pos_embed(
                self.config.hidden_size, grid, device=stored.device, dtype=stored.dtype
            ).unsqueeze(0)
            self._pos_cache[key] = cached
        return cached

    def unpatchify(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Tokens ``[B, Hg·Wg, p·p·C]`` → ``[B, C, Hg·p, Wg·p]``."""
        c, p = self.out_channels, self.patch_size
        hg, wg = grid
        x = x.reshape(x.shape[0], hg, wg, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, hg * p, wg * p)

    def _apply(self, fn, recurse=True):
        self._pos_cache.clear()  # .to()/.half() invalidate the recomputed embeddings
        return super()._apply(fn, recurse)

    # ----- forward ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ε (and v) for latents ``x`` at timesteps ``t`` with labels ``y``."""
        tokens, grid = self.x_embedder(x)
        batch = tokens.shape[0]
        t = torch.as_tensor(t, device=tokens.device)
        y = torch.as_tensor(y, device=tokens.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if y.dim() == 0:
            y = y.expand(batch)
        if t.shape != (batch,) or y.shape != (batch,):
            raise ValueError(
                f"t and y must be [batch] = [{batch}], got t {tuple(t.shape)}, y {tuple(y.shape)}"
            )
        h = tokens + self.pos_embed_for(grid)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            h = block(h, c, grid)
        h = self.final_layer(h, c)
        return self.unpatchify(h, grid)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        cfg_channels: int | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guidance in one batch: ``[cond; uncond]`` halves.

        The first half of ``x`` is used twice; ``y``'s second half is expected to
        hold the null class. ``ε = ε_u + s·(ε_c − ε_u)`` on the first
        ``cfg_channels`` output channels -- 3 by default, the original DiT's
        choice kept "for exact reproducibility" of its published FIDs; ``None``
        guides all ``in_channels`` channels (the standard formulation).
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        k = self.in_channels if cfg_channels is None else cfg_channels
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{c.name or 'custom'}: depth={c.depth}, hidden={c.hidden_size}, patch={c.patch_size}, "
            f"attention={c.attention} ({c.heads} heads)"
        )


def build_dit(name: str | DiTConfig = "DiT-XL/2", *, seed: int | None = None, **overrides) -> DiT:
    """A freshly initialised DiT of zoo config ``name`` (e.g. ``"DiT-XL/2"``) with overrides.

    ``overrides`` are :class:`DiTConfig` fields (``input_size=64``,
    ``attention="lit"``, ``attention_options={...}``, ``attention_heads=4``, ...);
    ``seed`` makes the init reproducible without touching the global RNG.
    """
    config = get_config(name, **overrides)
    if seed is None:
        return DiT(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DiT(config)
