"""A small class-conditional DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers").

One implementation for images [B, C, H, W] and video latents [B, C, T, H, W]: patches are cut by a
reshape + linear layer (the same for 2 and 3 spatial axes), the fixed sin-cos position embedding is
computed for the actual patch grid, and blocks use adaLN-Zero conditioning on (timestep + class).
Attention goes through `ddrl_engine.attention.attention`, so the backend is chosen by context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..attention import attention
from ..attention.context_parallel import check_context_parallel, gather_sequence, split_sequence
from .policy import Policy


@dataclass(frozen=True)
class DiTConfig:
    """DiT hyper-parameters. The defaults are the tiny 8x8x1 digits model (16 tokens, ~0.7M params).

    in_channels: channels C of the state.
    sample_size: spatial size, (H, W) or (T, H, W).
    patch_size: patch size per spatial axis, same length as sample_size; must divide it.
    hidden: token width; must be divisible by heads.
    depth: number of transformer blocks.
    heads: attention heads.
    mlp_ratio: MLP width / hidden.
    num_classes: real classes; class id num_classes is the null class (classifier-free guidance).
    timestep_freq_dim: width of the sinusoidal timestep features fed to the timestep MLP (even).
    """

    in_channels: int = 1
    sample_size: tuple[int, ...] = (8, 8)
    patch_size: tuple[int, ...] = (2, 2)
    hidden: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    timestep_freq_dim: int = 256

    def __post_init__(self) -> None:
        # Configs read from JSON/YAML carry lists; freeze them into tuples.
        object.__setattr__(self, "sample_size", tuple(int(s) for s in self.sample_size))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.sample_size) not in (2, 3):
            raise ValueError(f"DiTConfig.sample_size must be (H, W) or (T, H, W), got {self.sample_size}")
        if len(self.patch_size) != len(self.sample_size):
            raise ValueError(
                f"DiTConfig.patch_size {self.patch_size} must have one entry per axis of sample_size {self.sample_size}"
            )
        for s, p in zip(self.sample_size, self.patch_size):
            if p <= 0 or s <= 0 or s % p:
                raise ValueError(f"DiTConfig.patch_size {self.patch_size} must divide sample_size {self.sample_size}")
        for name in ("in_channels", "hidden", "depth", "heads", "num_classes", "timestep_freq_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DiTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"DiTConfig.hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.timestep_freq_dim <= 0 or self.timestep_freq_dim % 2:
            raise ValueError(f"DiTConfig.timestep_freq_dim must be positive and even, got {self.timestep_freq_dim}")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.sample_size)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(s // p for s, p in zip(self.sample_size, self.patch_size))

    def to_dict(self) -> dict:
        return asdict(self)


def sincos_position_embedding(grid: tuple[int, ...], dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed sin-cos embedding [prod(grid), dim] of a patch grid (row-major token order).

    Each axis gets an equal even share of `dim` (a 1-D sin-cos code of its coordinate); leftover
    channels are zero. Computed for whatever grid is asked, so no table is tied to one resolution.
    """
    n = len(grid)
    d_axis = 2 * (dim // (2 * n))
    if d_axis == 0:
        raise ValueError(f"hidden={dim} is too small for a {n}-axis position embedding (need >= {2 * n})")
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64, device=device) for g in grid], indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(d_axis // 2, dtype=torch.float64, device=device) / (d_axis // 2))
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * omega
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    emb = nn.functional.pad(emb, (0, dim - emb.shape[1]))
    return emb.float()


def timestep_features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [B, dim] of t * 1000 (the scale DiT's embedding was designed for)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated, and residuals gated, by the condition."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.cp_group = None  # context parallelism: the group this block's tokens are sharded over (DiT.set_context_parallel)
        self.cp_attention = "ulysses"  # and how attention crosses the shards
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        b, n, d = x.shape
        h = _modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = attention(q, k, v, cp_group=self.cp_group, cp_attention=self.cp_attention).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.proj(a)
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiT(Policy):
    """Class-conditional DiT policy; `forward(x, t, cond)` returns a tensor shaped like x.

    x may have any spatial size divisible by the patch size (the position embedding follows the
    grid); `sample_shape` is the configured one. A fresh model outputs exactly zero (adaLN-Zero).
    """

    def __init__(self, config: DiTConfig | None = None) -> None:
        config = DiTConfig() if config is None else config
        if not isinstance(config, DiTConfig):
            raise TypeError(f"config must be a DiTConfig, got {type(config).__name__}")
        super().__init__(config.sample_shape, config.num_classes)
        self.config = config
        patch_numel = config.in_channels * math.prod(config.patch_size)
        self.patch_embed = nn.Linear(patch_numel, config.hidden)
        self.t_embed = nn.Sequential(
            nn.Linear(config.timestep_freq_dim, config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.hidden)
        )
        self.class_embed = nn.Embedding(config.num_classes + 1, config.hidden)  # last row = null class
        self.blocks = nn.ModuleList(
            DiTBlock(config.hidden, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.final = FinalLayer(config.hidden, patch_numel)
        self._cp_group, self._cp_attention = None, "ulysses"
        self.reset_parameters()

    def set_context_parallel(self, group, attention: str = "ulysses") -> None:
        """Shards every sample's tokens over the ranks of `group` (a torch.distributed process group;
        None: off). Each rank embeds its contiguous slice of the patch tokens (position embedding by
        global index), runs the blocks on it (attention across the shards by `attention`: "ulysses",
        the all-to-all, or "ring", torch's ring), and the final layer's tokens are all-gathered, so
        the output is the whole sample on every rank. Needs the configured sample's token count (and
        for Ulysses the heads) divisible by the group size (checked)."""
        if group is not None:
            import torch.distributed as dist

            size = dist.get_world_size(group)
            check_context_parallel(self.config.heads, math.prod(self.config.grid), size, "DiT", attention)
            if size == 1:
                group = None
        self._cp_group, self._cp_attention = group, attention
        for blk in self.blocks:
            blk.cp_group, blk.cp_attention = group, attention

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for m in (self.t_embed[0], self.t_embed[2]):
            nn.init.normal_(m.weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero, so each block begins as the
        # identity and the fresh model predicts 0.
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[1].weight)
            nn.init.zeros_(blk.ada[1].bias)
        nn.init.zeros_(self.final.ada[1].weight)
        nn.init.zeros_(self.final.ada[1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def _grid(self, x: Tensor) -> tuple[int, ...]:
        spatial = tuple(x.shape[2:])
        if any(s % p for s, p in zip(spatial, self.config.patch_size)):
            raise ValueError(f"x spatial size {spatial} is not divisible by patch_size {self.config.patch_size}")
        return tuple(s // p for s, p in zip(spatial, self.config.patch_size))

    def patchify(self, x: Tensor) -> Tensor:
        """[B, C, *S] -> [B, N, C * prod(patch)], tokens in row-major grid order."""
        grid, patch = self._grid(x), self.config.patch_size
        n = len(grid)
        view = [x.shape[0], x.shape[1]] + [d for g, p in zip(grid, patch) for d in (g, p)]
        perm = [0] + [2 + 2 * i for i in range(n)] + [1] + [3 + 2 * i for i in range(n)]
        return x.reshape(view).permute(perm).reshape(x.shape[0], math.prod(grid), -1)

    def unpatchify(self, tokens: Tensor, grid: tuple[int, ...]) -> Tensor:
        """Inverse of `patchify`: [B, N, C * prod(patch)] -> [B, C, *S]."""
        patch, c, n = self.config.patch_size, self.config.in_channels, len(grid)
        x = tokens.reshape(tokens.shape[0], *grid, c, *patch)
        # dims now: 0=B, 1..n = grid, n+1 = C, n+2.. = patch; interleave back to (g_i, p_i).
        perm = [0, n + 1] + [d for i in range(n) for d in (1 + i, n + 2 + i)]
        return x.permute(perm).reshape(tokens.shape[0], c, *[g * p for g, p in zip(grid, patch)])

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        t = self.check_inputs(x, t, cond)
        grid = self._grid(x)
        dtype = self.patch_embed.weight.dtype
        group = self._cp_group
        if group is not None:
            return self._forward_context_parallel(x, t, cond, grid, group)
        h = self.patch_embed(self.patchify(x.to(dtype)))
        h = h + sincos_position_embedding(grid, self.config.hidden, device=x.device).to(dtype)
        c = self.t_embed(timestep_features(t, self.config.timestep_freq_dim).to(dtype)) + self.class_embed(cond)
        for blk in self.blocks:
            h = blk(h, c)
        return self.unpatchify(self.final(h, c), grid).to(x.dtype)

    def _forward_context_parallel(self, x: Tensor, t: Tensor, cond: Tensor, grid: tuple[int, ...], group) -> Tensor:
        """`forward` with this rank's slice of the tokens (see set_context_parallel)."""
        import torch.distributed as dist

        check_context_parallel(self.config.heads, math.prod(grid), dist.get_world_size(group), "DiT", self._cp_attention)
        dtype = self.patch_embed.weight.dtype
        h = self.patch_embed(split_sequence(self.patchify(x.to(dtype)), group))
        pos = sincos_position_embedding(grid, self.config.hidden, device=x.device).to(dtype)
        h = h + split_sequence(pos, group, dim=0)
        c = self.t_embed(timestep_features(t, self.config.timestep_freq_dim).to(dtype)) + self.class_embed(cond)
        for blk in self.blocks:
            h = blk(h, c)
        out = gather_sequence(self.final(h, c), group)
        return self.unpatchify(out, grid).to(x.dtype)
