"""The denoising UNet ε_θ(x_t, t): the paper's reference architecture and papa's fast CPU default, one class.

`arch: reference` rebuilds the PAPA reference UNet exactly (module names, state-dict keys and shapes as in
`tests/data/unet_state_dict.tsv`, 10,188,081 parameters, same forward), so checkpoints trained by the reference
code load directly. The fast default keeps the same blocks but drops self-attention where it is expensive: attention
over 784 tokens at 28×28 dominates the reference's CPU cost, while attention in the 7×7 mid block is cheap. Which
blocks carry attention is a per-block switch (`down_attention`; up blocks mirror it; mid blocks always have it).

Block anatomy (docs/ALGORITHMS.md §1): each layer is GroupNorm(8)–SiLU–Conv3×3, + Linear(SiLU(t_emb)), GroupNorm(8)–SiLU–
Conv3×3, + 1×1-conv residual of the layer input, then (optionally) GroupNorm + multi-head self-attention, residual add.
"""
from __future__ import annotations

import torch
from torch import nn


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding: factor_i = 10000^(i/half), emb = [sin(t/factor), cos(t/factor)]."""
    half = dim // 2
    factor = 10000 ** (torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] / factor
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class _ResAttnLayers(nn.Module):
    """`n_res` resnet layers, and attention after layers as the block kind says; names match the reference."""

    def __init__(self, in_ch: int, out_ch: int, t_dim: int, n_res: int, n_attn: int, heads: int):
        super().__init__()
        ch = lambda i: in_ch if i == 0 else out_ch
        self.resnet_conv_first = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(8, ch(i)), nn.SiLU(), nn.Conv2d(ch(i), out_ch, 3, 1, 1)) for i in range(n_res))
        self.t_emb_layers = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(t_dim, out_ch)) for _ in range(n_res))
        self.resnet_conv_second = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(8, out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, 1, 1)) for _ in range(n_res))
        if n_attn:
            self.attention_norms = nn.ModuleList(nn.GroupNorm(8, out_ch) for _ in range(n_attn))
            self.attentions = nn.ModuleList(nn.MultiheadAttention(out_ch, heads, batch_first=True)
                                            for _ in range(n_attn))
        self.residual_input_conv = nn.ModuleList(nn.Conv2d(ch(i), out_ch, 1) for i in range(n_res))

    def resnet(self, i: int, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        out = self.resnet_conv_first[i](x)
        out = out + self.t_emb_layers[i](t_emb)[:, :, None, None]
        out = self.resnet_conv_second[i](out)
        return out + self.residual_input_conv[i](x)

    def attend(self, i: int, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        a = self.attention_norms[i](x.reshape(b, c, h * w)).transpose(1, 2)
        a, _ = self.attentions[i](a, a, a, need_weights=False)
        return x + a.transpose(1, 2).reshape(b, c, h, w)


class DownBlock(_ResAttnLayers):
    def __init__(self, in_ch, out_ch, t_dim, down_sample, attention, num_layers, heads):
        super().__init__(in_ch, out_ch, t_dim, num_layers, num_layers if attention else 0, heads)
        self.num_layers, self.attention = num_layers, attention
        self.down_sample_conv = nn.Conv2d(out_ch, out_ch, 4, 2, 1) if down_sample else nn.Identity()

    def forward(self, x, t_emb):
        for i in range(self.num_layers):
            x = self.resnet(i, x, t_emb)
            if self.attention:
                x = self.attend(i, x)
        return self.down_sample_conv(x)


class MidBlock(_ResAttnLayers):
    """resnet, then (attention, resnet) × num_layers."""

    def __init__(self, in_ch, out_ch, t_dim, num_layers, heads):
        super().__init__(in_ch, out_ch, t_dim, num_layers + 1, num_layers, heads)
        self.num_layers = num_layers

    def forward(self, x, t_emb):
        x = self.resnet(0, x, t_emb)
        for i in range(self.num_layers):
            x = self.resnet(i + 1, self.attend(i, x), t_emb)
        return x


class UpBlock(_ResAttnLayers):
    """Up-sample (ConvTranspose on in_ch//2 channels), concatenate the skip, then the layers."""

    def __init__(self, in_ch, out_ch, t_dim, up_sample, attention, num_layers, heads):
        super().__init__(in_ch, out_ch, t_dim, num_layers, num_layers if attention else 0, heads)
        self.num_layers, self.attention = num_layers, attention
        self.up_sample_conv = nn.ConvTranspose2d(in_ch // 2, in_ch // 2, 4, 2, 1) if up_sample else nn.Identity()

    def forward(self, x, skip, t_emb):
        x = torch.cat([self.up_sample_conv(x), skip], dim=1)
        for i in range(self.num_layers):
            x = self.resnet(i, x, t_emb)
            if self.attention:
                x = self.attend(i, x)
        return x


class UNet(nn.Module):
    def __init__(self, im_channels=1, down_channels=(32, 64, 128, 256), mid_channels=(256, 256, 128),
                 down_sample=(True, True, False), down_attention=(True, True, True), time_emb_dim=128,
                 num_down_layers=2, num_mid_layers=2, num_up_layers=2, num_heads=4):
        super().__init__()
        dc, mc = list(down_channels), list(mid_channels)
        self.time_emb_dim = time_emb_dim
        self.conv_in = nn.Conv2d(im_channels, dc[0], 3, padding=1)
        self.t_proj = nn.Sequential(nn.Linear(time_emb_dim, time_emb_dim), nn.SiLU(),
                                    nn.Linear(time_emb_dim, time_emb_dim))
        self.downs = nn.ModuleList(
            DownBlock(dc[i], dc[i + 1], time_emb_dim, down_sample[i], down_attention[i], num_down_layers, num_heads)
            for i in range(len(dc) - 1))
        self.mids = nn.ModuleList(MidBlock(mc[i], mc[i + 1], time_emb_dim, num_mid_layers, num_heads)
                                  for i in range(len(mc) - 1))
        self.ups = nn.ModuleList(
            UpBlock(dc[i] * 2, dc[i - 1] if i != 0 else 16, time_emb_dim, down_sample[i], down_attention[i],
                    num_up_layers, num_heads)
            for i in reversed(range(len(dc) - 1)))
        self.norm_out = nn.GroupNorm(8, 16)
        self.conv_out = nn.Conv2d(16, im_channels, 3, padding=1)

    def _encode(self, x: torch.Tensor, t: torch.Tensor):
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        t_emb = self.t_proj(time_embedding(t.long(), self.time_emb_dim))
        out = self.conv_in(x)
        skips = []
        for down in self.downs:
            skips.append(out)
            out = down(out, t_emb)
        for mid in self.mids:
            out = mid(out, t_emb)
        return out, skips, t_emb

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The bottleneck (the middle blocks' output, (B, mid_channels[-1], h, w)) of noised x at step t: what
        papa.select's preference model reads."""
        return self._encode(x, t)[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] noised; t: (B,) integer timesteps (or a scalar). Returns ε̂ like x."""
        out, skips, t_emb = self._encode(x, t)
        for up in self.ups:
            out = up(out, skips.pop(), t_emb)
        return self.conv_out(nn.functional.silu(self.norm_out(out)))


REFERENCE_KWARGS = dict(im_channels=1, down_channels=[32, 64, 128, 256], mid_channels=[256, 256, 128],
                        down_sample=[True, True, False], down_attention=[True, True, True], time_emb_dim=128,
                        num_down_layers=2, num_mid_layers=2, num_up_layers=2, num_heads=4)


def build_unet(model_cfg) -> UNet:
    """Build from a ModelConfig. `reference` ignores the other fields except im_channels."""
    if model_cfg.arch == "reference":
        return UNet(**{**REFERENCE_KWARGS, "im_channels": model_cfg.im_channels})
    return UNet(im_channels=model_cfg.im_channels, down_channels=model_cfg.down_channels,
                mid_channels=model_cfg.mid_channels, down_sample=model_cfg.down_sample,
                down_attention=model_cfg.down_attention, time_emb_dim=model_cfg.time_emb_dim,
                num_down_layers=model_cfg.num_down_layers, num_mid_layers=model_cfg.num_mid_layers,
                num_up_layers=model_cfg.num_up_layers, num_heads=model_cfg.num_heads)
