"""Honeybee's C-Abstractor (``c_abstractor``): a convolutional abstractor that keeps local context
and sets the token count.

    features [B, N, Dv] + learned position embedding (one row per patch)
    -> depth x RegNet-Y block (Dv -> H, then H -> H)  on the g x g grid
    -> adaptive average pooling to sqrt(M) x sqrt(M)
    -> depth x RegNet-Y block (H -> H)
    -> Linear(H, D) - SiLU - Linear(D, D)                            -> [B, M, D]

A RegNet-Y block is timm's ``RegStage`` bottleneck as Honeybee configures it: 1x1 conv, depthwise
3x3 conv, squeeze-excite (reduction to a quarter of the block's *input* width), 1x1 conv, each conv
without bias and followed by a channel LayerNorm, SiLU after the first two and after the residual
sum; the shortcut is a 1x1 conv + LayerNorm where the width changes.

The pooling is a fixed matrix, not ``nn.AdaptiveAvgPool2d``: the same bins (row i of a side
averages ``floor(i*g/m) .. ceil((i+1)*g/m) - 1``), applied as two MatMuls by a constant. The
TorchScript ONNX exporter refuses adaptive pooling whose output size does not divide its input
("output size that are not factor of input size": 24 -> 16 for 256 tokens); a MatMul by a constant
exports to every target.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgevlm.runtime.errors import EdgeVLMError

from . import INTEGRATORS
from .base import check_grid
from .blocks import square_side
from .ldp import ChannelLayerNorm


def adaptive_pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: row i averages AdaptiveAvgPool's bin i (start floor(i*n/m), end ceil((i+1)*n/m))."""
    p = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        p[i, start:end] = 1.0 / (end - start)
    return p.float()


class FixedAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d((m, m))`` for a fixed ``n_in`` x ``n_in`` input, as MatMuls."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.register_buffer("weight", adaptive_pool_matrix(n_in, n_out), persistent=False)  # [m, g]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, g, g] -> [B, C, m, m]
        x = torch.matmul(self.weight, x)  # pool rows: [B, C, m, g]
        return torch.matmul(x, self.weight.t())  # pool columns: [B, C, m, m]

    def extra_repr(self) -> str:
        return f"{self.n_in}x{self.n_in} -> {self.n_out}x{self.n_out}"


class SqueezeExcite(nn.Module):
    """timm ``SEModule``: channel gate sigmoid(fc2(SiLU(fc1(mean over H, W))))."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        s = x.mean((2, 3), keepdim=True)  # [B, C, 1, 1]
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


def _conv_norm(cin: int, cout: int, kernel: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False),
                         ChannelLayerNorm(cout, nn.SiLU() if act else None))


class RegBlock(nn.Module):
    """RegNet-Y bottleneck (bottle ratio 1, group width 1 = depthwise, SE 1/4 of the input width)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = _conv_norm(cin, cout)
        self.conv2 = _conv_norm(cout, cout, 3, groups=cout)
        self.se = SqueezeExcite(cout, int(round(cin * 0.25)))
        self.conv3 = _conv_norm(cout, cout, act=False)
        self.shortcut = nn.Identity() if cin == cout else _conv_norm(cin, cout, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, H, W] -> [B, Cout, H, W]
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return F.silu(y + self.shortcut(x))


def reg_stage(depth: int, cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*(RegBlock(cin if i == 0 else cout, cout) for i in range(depth)))


@INTEGRATORS.register("c_abstractor")
class CAbstractor(nn.Module):
    """Honeybee C-Abstractor: N patches -> ``num_tokens`` (a perfect square, default 144).

    kwargs: ``num_tokens`` (M), ``depth`` (RegNet blocks before and after pooling, default 3),
    ``hidden_dim`` (block width H, default the vision width as in Honeybee)."""

    gguf_projector = None
    export_refusals = {"gguf": "llama.cpp has no C-Abstractor projector type (RegNet-Y blocks around "
                               "an adaptive average pool); none of its graphs computes it"}

    def __init__(self, vision_dim: int, llm_dim: int, grid: int, *, num_tokens: int = 144, depth: int = 3,
                 hidden_dim: int | None = None):
        super().__init__()
        side = square_side(num_tokens, "c_abstractor num_tokens")
        if side > grid:
            raise EdgeVLMError(f"c_abstractor num_tokens={num_tokens} ({side}x{side}) is more than the "
                               f"{grid}x{grid} patch grid; it pools, it does not upsample")
        if not isinstance(depth, int) or depth < 1:
            raise EdgeVLMError(f"c_abstractor depth must be a positive integer, got {depth!r}")
        hidden = hidden_dim or vision_dim
        self.grid, self.side = grid, side
        self.pos_emb = nn.Parameter(torch.zeros(1, grid * grid, vision_dim))  # [1, N, Dv]
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        self.s1 = reg_stage(depth, vision_dim, hidden)
        self.pool = FixedAdaptiveAvgPool2d(grid, side)
        self.s2 = reg_stage(depth, hidden, hidden)
        self.readout = nn.Sequential(nn.Linear(hidden, llm_dim), nn.SiLU(), nn.Linear(llm_dim, llm_dim))

    def num_tokens(self, n_features: int) -> int:
        return self.side * self.side

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, g*g, Dv] -> [B, M, D]
        check_grid("c_abstractor", x.shape[1], self.grid)
        x = x + self.pos_emb
        x = x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)  # [B, Dv, g, g]
        x = self.s2(self.pool(self.s1(x)))  # [B, H, m, m]
        return self.readout(x.flatten(2).transpose(1, 2))  # [B, m*m, H] -> [B, M, D]
