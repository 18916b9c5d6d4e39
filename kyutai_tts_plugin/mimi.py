"""Mimi, the neural audio codec of the TTS: codes -> 24 kHz audio, streamed one 80 ms frame at a time.

Parameters are named as in the released `tokenizer-e351c8d8-checkpoint125.safetensors`. The decoder
state (causal-conv left context, transposed-conv overlap, transformer KV window) is held per row of a
fixed batch, so each engine slot decodes its own stream and can be reset alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError

_REAL: dict[str, Any] = {
    "sample_rate": 24000,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {
        "channels": 1,
        "dimension": 512,
        "causal": True,
        "n_filters": 64,
        "n_residual_layers": 1,
        "activation": "ELU",
        "compress": 2,
        "dilation_base": 2,
        "disable_norm_outer_blocks": 0,
        "kernel_size": 7,
        "residual_kernel_size": 3,
        "last_kernel_size": 3,
        "norm": "none",
        "pad_mode": "constant",
        "ratios": [8, 6, 5, 4],
        "true_skip": True,
    },
    "quantizer": {"dimension": 256, "n_q": 32, "bins": 2048, "input_dimension": 512, "output_dimension": 512},
    "transformer": {
        "d_model": 512,
        "num_heads": 8,
        "num_layers": 8,
        "causal": True,
        "layer_scale": 0.01,
        "context": 250,
        "conv_layout": True,
        "max_period": 10000,
        "gating": "none",
        "norm": "layer_norm",
        "positional_embedding": "rope",
        "dim_feedforward": 2048,
        "input_dimension": 512,
        "output_dimensions": [512],
    },
}


@dataclass(frozen=True)
class MimiConfig:
    """Mimi hyper-parameters, in the layout of moshi's `mimi_config` json (`mimi_config_name`)."""

    raw: Mapping[str, Any]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MimiConfig:
        for key in ("sample_rate", "frame_rate", "seanet", "quantizer", "transformer"):
            if key not in d:
                raise CheckpointError(f"mimi config: missing key '{key}'")
        return cls(copy.deepcopy(dict(d)))

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self.raw))

    @property
    def seanet(self) -> Mapping[str, Any]:
        return self.raw["seanet"]

    @property
    def quantizer(self) -> Mapping[str, Any]:
        return self.raw["quantizer"]

    @property
    def transformer(self) -> Mapping[str, Any]:
        return self.raw["transformer"]


REAL_MIMI_CONFIG = MimiConfig(_REAL)
_tiny = copy.deepcopy(_REAL)
_tiny["seanet"].update(n_filters=4, dimension=32)
_tiny["quantizer"].update(dimension=16, input_dimension=32, output_dimension=32)
_tiny["transformer"].update(
    d_model=32, num_heads=4, num_layers=2, dim_feedforward=64, input_dimension=32, output_dimensions=[32]
)
TINY_MIMI_CONFIG = MimiConfig(_tiny)


# ----------------------------------------------------------------------------------------------
# Modules, named like the checkpoint


class _Conv(nn.Module):
    """`<name>.conv.conv.{weight,bias}`: a causal 1-d convolution."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Module()
        self.conv.conv = nn.Conv1d(cin, cout, kernel, stride, bias=bias)
        self.context = kernel - stride  # input samples carried from one chunk to the next

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([state, x], dim=-1)
        return self.conv.conv(x), x[..., x.shape[-1] - self.context :]


class _ConvTr(nn.Module):
    """`<name>.convtr.convtr.{weight,bias}`: a causal transposed convolution."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1, bias: bool = True
    ) -> None:
        super().__init__()
        self.convtr = nn.Module()
        self.convtr.convtr = nn.ConvTranspose1d(cin, cout, kernel, stride, groups=groups, bias=bias)
        self.overlap = kernel - stride  # output samples still receiving contributions

    def forward(self, x: torch.Tensor, partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conv = self.convtr.convtr
        y = conv(x)
        n = self.overlap
        head = y[..., :n] + partial
        tail = y[..., -n:]
        if conv.bias is not None:  # the bias belongs to the chunk that completes the sample
            tail = tail - conv.bias[:, None]
        return torch.cat([head, y[..., n:-n]], dim=-1), tail


class _ResBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([nn.ELU(), _Conv(dim, hidden, kernel), nn.ELU(), _Conv(hidden, dim, 1)])


class _TransformerLayer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, layer_scale: float | None) -> None:
        super().__init__()
        self.heads = heads
        self.self_attn = nn.Module()
        self.self_attn.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.self_attn.out_proj = nn.Linear(d, d, bias=False)
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.linear1 = nn.Linear(d, ff, bias=False)
        self.linear2 = nn.Linear(ff, d, bias=False)
        if layer_scale is not None:
            self.layer_scale_1 = nn.Module()
            self.layer_scale_1.scale = nn.Parameter(torch.full((d,), layer_scale))
            self.layer_scale_2 = nn.Module()
            self.layer_scale_2.scale = nn.Parameter(torch.full((d,), layer_scale))
        self.has_scale = layer_scale is not None


class MimiModel(nn.Module):
    """The Mimi decoder side (RVQ decode, upsampling, transformer, SEANet decoder)."""

    def __init__(self, config: MimiConfig = REAL_MIMI_CONFIG) -> None:
        super().__init__()
        self.config = config
        sn, qz, tr = config.seanet, config.quantizer, config.transformer
        self.sample_rate = int(config.raw["sample_rate"])
        self.frame_rate = float(config.raw["frame_rate"])
        ratios = list(sn["ratios"])
        self.hop = math.prod(ratios)
        self.frame_size = int(round(self.sample_rate / self.frame_rate))
        self.upsample_stride = self.frame_size // self.hop
        self.num_codebooks = int(qz["n_q"])
        dim, qdim, bins = int(sn["dimension"]), int(qz["dimension"]), int(qz["bins"])

        self.quantizer = nn.Module()
        self.quantizer.rvq_first = _RVQ(1, qdim, dim, bins)
        self.quantizer.rvq_rest = _RVQ(self.num_codebooks - 1, qdim, dim, bins)

        s = self.upsample_stride
        self.upsample = nn.Module()
        self.upsample.convtr = _ConvTr(dim, dim, 2 * s, s, groups=dim, bias=False)

        self.decoder_transformer = nn.Module()
        self.decoder_transformer.transformer = nn.Module()
        d = int(tr["d_model"])
        if d != dim or list(tr.get("output_dimensions", [d])) != [dim]:
            raise CheckpointError(
                "mimi config: projected transformers are not supported (d_model != dimension)"
            )
        self.decoder_transformer.transformer.layers = nn.ModuleList(
            _TransformerLayer(d, int(tr["num_heads"]), int(tr["dim_feedforward"]), tr.get("layer_scale"))
            for _ in range(int(tr["num_layers"]))
        )
        self.context = int(tr["context"])
        self.max_period = float(tr.get("max_period", 10000))

        nf, compress = int(sn["n_filters"]), int(sn.get("compress", 2))
        mult = 2 ** len(ratios)
        layers: list[nn.Module] = [_Conv(dim, mult * nf, int(sn["kernel_size"]))]
        for r in ratios:
            layers += [nn.ELU(), _ConvTr(mult * nf, mult * nf // 2, 2 * r, r)]
            mult //= 2
            layers.append(_ResBlock(mult * nf, mult * nf // compress, int(sn["residual_kernel_size"])))
        layers += [nn.ELU(), _Conv(nf, int(sn["channels"]), int(sn["last_kernel_size"]))]
        self.decoder = nn.Module()
        self.decoder.model = nn.ModuleList(layers)

    @classmethod
    def from_safetensors(
        cls, path: str | Path, config: MimiConfig | None = None, device: str | torch.device = "cpu"
    ) -> MimiModel:
        from .checkpoint import load_safetensors

        model = cls(config or REAL_MIMI_CONFIG)
        state = load_safetensors(path)
        model.load_checkpoint(state, str(path))
        return model.to(device).eval()

    def load_checkpoint(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Load the decoder tensors of a Mimi checkpoint (encoder tensors are ignored)."""
        own = self.state_dict()
        for key, ref in own.items():
            if key.endswith("._codebook.embedding"):
                continue
            if key not in state:
                raise CheckpointError(f"{source}: missing tensor '{key}' of the Mimi decoder")
            if tuple(state[key].shape) != tuple(ref.shape):
                raise CheckpointError(
                    f"{source}: tensor '{key}' has shape {list(state[key].shape)}, expected {list(ref.shape)}"
                )
        loaded = {k: state[k].float() for k in own if not k.endswith("._codebook.embedding")}
        self.load_state_dict(loaded, strict=False)
        for rvq in (self.quantizer.rvq_first, self.quantizer.rvq_rest):
            for layer in rvq.vq.layers:
                cb = layer._codebook
                cb.embedding.data = cb.embedding_sum / cb.cluster_usage.clamp(min=1e-5)[:, None]

    # -- one-shot decode (a fresh stream, all frames at once) ---------------------------------

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n, T] -> pcm [B, 1, T * frame_size]."""
        dec = MimiStreamingDecoder(self, codes.shape[0])
        rows = list(range(codes.shape[0]))
        frames = [dec.decode_step(codes[:, :, t : t + 1], rows) for t in range(codes.shape[-1])]
        return torch.stack(frames, dim=-1).transpose(1, 2).reshape(codes.shape[0], 1, -1)


class _Codebook(nn.Module):
    def __init__(self, bins: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("_initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))
        self.register_buffer("embedding", torch.zeros(bins, dim), persistent=False)


class _RVQ(nn.Module):
    def __init__(self, n: int, qdim: int, dim: int, bins: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(dim, qdim, 1, bias=False)
        self.output_proj = nn.Conv1d(qdim, dim, 1, bias=False)
        self.vq = nn.Module()
        self.vq.layers = nn.ModuleList()
        for _ in range(n):
            layer = nn.Module()
            layer._codebook = _Codebook(bins, qdim)
            self.vq.layers.append(layer)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n, T] -> latent [B, dim, T]."""
        total = None
        for i in range(codes.shape[1]):
            e = F.embedding(codes[:, i], self.vq.layers[i]._codebook.embedding)  # [B, T, qdim]
            total = e if total is None else total + e
        assert total is not None
        return F.conv1d(total.transpose(1, 2), self.output_proj.weight)


def _rope(x: torch.Tensor, positions: torch.Tensor, max_period: float) -> torch.Tensor:
    d = x.shape[-1]
    freqs = torch.exp(
        torch.arange(d // 2, dtype=torch.float32, device=x.device) * (-math.log(max_period) * 2 / d)
    )
    ang = positions.float()[:, None, :, None] * freqs
    cos, sin = torch.cos(ang), torch.sin(ang)
    xr, xi = x.unflatten(-1, (-1, 2)).float().unbind(-1)
    return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2).to(x.dtype)


def encoder_shapes(config: MimiConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the encoder half of a Mimi checkpoint (this package decodes only)."""
    sn, tr = config.seanet, config.transformer
    nf, dim, compress = int(sn["n_filters"]), int(sn["dimension"]), int(sn.get("compress", 2))
    ks, rk, lk = int(sn["kernel_size"]), int(sn["residual_kernel_size"]), int(sn["last_kernel_size"])
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        shapes[f"encoder.model.{name}.conv.conv.weight"] = (cout, cin, k)
        shapes[f"encoder.model.{name}.conv.conv.bias"] = (cout,)

    conv("0", int(sn["channels"]), nf, ks)
    mult, n = 1, 1
    for r in reversed(list(sn["ratios"])):
        c = mult * nf
        conv(f"{n}.block.1", c, c // compress, rk)
        conv(f"{n}.block.3", c // compress, c, 1)
        conv(str(n + 2), c, 2 * c, 2 * r)
        mult, n = mult * 2, n + 3
    conv(str(n + 1), mult * nf, dim, lk)
    d, ff = int(tr["d_model"]), int(tr["dim_feedforward"])
    for i in range(int(tr["num_layers"])):
        p = f"encoder_transformer.transformer.layers.{i}."
        shapes |= {
            p + "self_attn.in_proj_weight": (3 * d, d),
            p + "self_attn.out_proj.weight": (d, d),
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
            p + "linear1.weight": (ff, d),
            p + "linear2.weight": (d, ff),
            p + "layer_scale_1.scale": (d,),
            p + "layer_scale_2.scale": (d,),
        }
    shapes["downsample.conv.conv.conv.weight"] = (dim, dim, 4)
    return shapes


def random_mimi_state_dict(config: MimiConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for a whole Mimi checkpoint (decoder and encoder halves, checkpoint naming)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    tensors = {k: t.shape for k, t in MimiModel(config).state_dict().items()} | encoder_shapes(config)
    for key, shape in tensors.items():
        t = torch.empty(shape)
        if key.endswith("cluster_usage"):
            v = torch.rand(t.shape, generator=gen) + 0.5
        elif key.endswith("_initialized"):
            v = torch.ones(t.shape)
        elif key.endswith(".scale"):
            v = torch.full(t.shape, 0.01)
        elif key.endswith("norm1.weight") or key.endswith("norm2.weight"):
            v = torch.ones(t.shape)
        elif key.endswith(".bias"):
            v = torch.randn(t.shape, generator=gen) * 0.01
        else:
            fan_in = t[0].numel() if t.dim() > 1 else t.numel()
            v = torch.randn(t.shape, generator=gen) / math.sqrt(max(1, fan_in))
        out[key] = v.float().contiguous()
    return out


# ----------------------------------------------------------------------------------------------
# Streaming decode with per-row state


class MimiStreamingDecoder:
    """Decode one frame per call for any subset of rows of a fixed batch; rows are independent."""

    def __init__(self, mimi: MimiModel, batch_size: int) -> None:
        self.mimi = mimi
        dev = next(mimi.parameters()).device
        self.device = dev

        def zeros(channels: int, length: int) -> torch.Tensor:
            return torch.zeros(batch_size, channels, length, device=dev)

        self.up_partial = zeros(mimi.upsample.convtr.convtr.convtr.in_channels, mimi.upsample.convtr.overlap)
        self.states: list[torch.Tensor | None] = []
        for layer in mimi.decoder.model:
            if isinstance(layer, _Conv):
                self.states.append(zeros(layer.conv.conv.in_channels, layer.context))
            elif isinstance(layer, _ConvTr):
                self.states.append(zeros(layer.convtr.convtr.out_channels, layer.overlap))
            elif isinstance(layer, _ResBlock):
                c1, c2 = layer.block[1], layer.block[3]
                self.states.append(zeros(c1.conv.conv.in_channels, c1.context))
                self.states.append(zeros(c2.conv.conv.in_channels, c2.context))
            else:
                self.states.append(None)
        tr_layers = mimi.decoder_transformer.transformer.layers
        d = int(mimi.config.transformer["d_model"])
        heads = int(mimi.config.transformer["num_heads"])
        shape = (len(tr_layers), batch_size, heads, mimi.context, d // heads)
        self.k = torch.zeros(shape, device=dev)
        self.v = torch.zeros(shape, device=dev)
        self.cell_pos = torch.full((batch_size, mimi.context), -1, dtype=torch.long, device=dev)
        self.offset = torch.zeros(batch_size, dtype=torch.long, device=dev)

    def reset(self, rows: Sequence[int] | torch.Tensor) -> None:
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.up_partial[idx] = 0
        for s in self.states:
            if s is not None:
                s[idx] = 0
        self.cell_pos[idx] = -1
        self.offset[idx] = 0

    @torch.no_grad()
    def decode_step(self, codes: torch.Tensor, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """codes [n, n_q, 1] -> pcm [n, frame_size] (not clamped); advances only `rows`."""
        m = self.mimi
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        q = m.quantizer
        x = q.rvq_first.decode(codes[:, :1])
        if codes.shape[1] > 1:
            x = x + q.rvq_rest.decode(codes[:, 1:])
        x, self.up_partial[idx] = m.upsample.convtr(x, self.up_partial[idx])
        x = self._transformer(x, idx)
        si = 0
        for layer in m.decoder.model:
            if isinstance(layer, nn.ELU):
                x = F.elu(x)
                si += 1
                continue
            if isinstance(layer, _ResBlock):
                h = F.elu(x)
                h, self.states[si][idx] = layer.block[1](h, self.states[si][idx])
                h = F.elu(h)
                h, self.states[si + 1][idx] = layer.block[3](h, self.states[si + 1][idx])
                x = x + h
                si += 2
                continue
            x, self.states[si][idx] = layer(x, self.states[si][idx])
            si += 1
        return x[:, 0]

    def _transformer(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        m = self.mimi
        x = x.transpose(1, 2)  # [n, T, d]
        n, t, d = x.shape
        ctx = m.context
        pos = self.offset[idx][:, None] + torch.arange(t, device=x.device)[None]  # [n, T]
        cells = pos % ctx
        self.cell_pos[idx[:, None], cells] = pos
        cell_pos = self.cell_pos[idx]  # [n, C]
        delta = pos[:, :, None] - cell_pos[:, None, :]
        mask = ((cell_pos[:, None, :] >= 0) & (delta >= 0) & (delta < ctx))[:, None]  # [n,1,T,C]
        for li, layer in enumerate(m.decoder_transformer.transformer.layers):
            h = layer.norm1(x)
            qkv = (
                F.linear(h, layer.self_attn.in_proj_weight)
                .view(n, t, 3, layer.heads, -1)
                .permute(2, 0, 3, 1, 4)
            )
            qq, kk, vv = qkv.unbind(0)
            qq, kk = _rope(qq, pos, m.max_period), _rope(kk, pos, m.max_period)
            kc, vc = self.k[li], self.v[li]
            for j in range(t):
                kc[idx, :, cells[:, j]] = kk[:, :, j]
                vc[idx, :, cells[:, j]] = vv[:, :, j]
            a = F.scaled_dot_product_attention(qq, kc[idx], vc[idx], mask)
            a = layer.self_attn.out_proj(a.transpose(1, 2).reshape(n, t, d))
            x = x + (layer.layer_scale_1.scale * a if layer.has_scale else a)
            f = layer.linear2(F.gelu(layer.linear1(layer.norm2(x))))
            x = x + (layer.layer_scale_2.scale * f if layer.has_scale else f)
        self.offset[idx] += t
        return x.transpose(1, 2)
