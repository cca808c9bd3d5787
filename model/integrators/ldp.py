"""MobileVLM's lightweight downsample projectors, structurally identical to the official code so
checkpoints load key for key: ``ldp`` (v1, ``ldpnet``) and ``ldpv2`` (V2, ``ldpnetv2``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import INTEGRATORS
from .base import check_grid


def make_divisible(v: float, divisor: int = 8) -> int:
    """MobileNet channel rounding (as torchvision / MobileVLM use it)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW map, optionally followed by an activation."""

    def __init__(self, channels: int, act: nn.Module | None = None, eps: float = 1e-5):
        super().__init__(channels, eps=eps)
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        s = F.adaptive_avg_pool2d(x, 1)  # [B, C, 1, 1]
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class InvertedResidual(nn.Module):
    """MobileNetV3 block without expansion: dw3x3-LN-hardswish, SE, pw1x1-LN; residual at stride 1."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.use_res = stride == 1
        self.block = nn.Sequential(
            nn.Sequential(nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False),
                          ChannelLayerNorm(channels, nn.Hardswish())),
            SqueezeExcite(channels, make_divisible(channels // 4)),
            nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), ChannelLayerNorm(channels)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res else y


class LDPBlock(nn.Module):
    def __init__(self, inc: int, ouc: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(ouc, 1), InvertedResidual(ouc, 2))

    def forward(self, x: torch.Tensor, grid: int) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.mlp(x)  # [B, N, D]
        x = x.transpose(1, 2).reshape(b, -1, grid, grid)  # [B, D, g, g]
        x = self.mb_block(x)  # [B, D, g/2, g/2]
        return x.flatten(2).transpose(1, 2)  # [B, g*g/4, D]


@INTEGRATORS.register("ldp")
class LDPProjector(nn.Module):
    """MobileVLM v1 LDP: MLP then two inverted residual blocks (stride 1, 2): N -> N/4 tokens."""

    gguf_projector = "ldp"
    official_type = "ldpnet"

    def __init__(self, vision_dim: int, llm_dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.model = LDPBlock(vision_dim, llm_dim)

    def num_tokens(self, n_features: int) -> int:
        return ((self.grid + 1) // 2) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, g*g, Dv] -> [B, (g/2)^2, D]
        check_grid("ldp", x.shape[1], self.grid)
        return self.model(x, self.grid)


class _FeatureMLP(nn.Module):
    def __init__(self, inc: int, ouc: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class _PosInject(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        return self.peg(x) + x


@INTEGRATORS.register("ldpv2")
class LDPv2Projector(nn.Module):
    """MobileVLM V2 LDP: MLP, 2x2 average pool, depthwise-conv positional residual: N -> N/4."""

    gguf_projector = "ldpv2"
    official_type = "ldpnetv2"

    def __init__(self, vision_dim: int, llm_dim: int, grid: int):
        super().__init__()
        if grid % 2:
            raise ValueError(f"ldpv2 needs an even patch grid, got {grid}")
        self.grid = grid
        self.mlp = _FeatureMLP(vision_dim, llm_dim)
        self.peg = _PosInject(llm_dim)

    def num_tokens(self, n_features: int) -> int:
        return (self.grid // 2) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, g*g, Dv] -> [B, (g/2)^2, D]
        check_grid("ldpv2", x.shape[1], self.grid)
        b = x.shape[0]
        x = self.mlp(x).transpose(1, 2).reshape(b, -1, self.grid, self.grid)  # [B, D, g, g]
        x = F.avg_pool2d(x, 2)  # == AdaptiveAvgPool2d(g/2) for even g; [B, D, g/2, g/2]
        x = self.peg(x)
        return x.flatten(2).transpose(1, 2)  # [B, (g/2)^2, D]
