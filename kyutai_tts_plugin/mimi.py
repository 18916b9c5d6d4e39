"""Mimi, the neural audio codec of the TTS: 24 kHz audio <-> 32 codebooks at 12.5 Hz.

Module and parameter names are those of the released `tokenizer-e351c8d8-checkpoint125.safetensors`
(fused attention `in_proj_weight`), so `state_dict()` *is* the checkpoint naming.

Every stateful block (causal conv, causal transposed conv, transformer) takes an optional `_StreamState`:
without one it runs one-shot from a fresh start (zero left context), with one it reads and writes the
state of the selected rows of a fixed batch. One-shot decoding and streaming decoding therefore share one
code path, and a fresh streaming row behaves exactly like a fresh stream of the reference.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_safetensors
from .errors import CheckpointError

# ----------------------------------------------------------------------------------------------
# Configuration


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


# Keys of each section of moshi's `_mimi_config`, and the value we require where we implement only one
# variant (None: any value). A missing key would make moshi fall back to a default that differs from
# the released model (e.g. `positional_embedding="sin"`), so every key is required.
_SEANET_KEYS: dict[str, Any] = {
    "channels": None, "dimension": None, "causal": True, "n_filters": None, "n_residual_layers": None,
    "activation": "ELU", "compress": None, "dilation_base": None, "disable_norm_outer_blocks": None,
    "kernel_size": None, "residual_kernel_size": None, "last_kernel_size": None, "norm": "none",
    "pad_mode": "constant", "ratios": None, "true_skip": True,
}  # fmt: skip
_QUANTIZER_KEYS: dict[str, Any] = {
    "dimension": None, "n_q": None, "bins": None, "input_dimension": None, "output_dimension": None,
}  # fmt: skip
_TRANSFORMER_KEYS: dict[str, Any] = {
    "d_model": None, "num_heads": None, "num_layers": None, "causal": True, "layer_scale": None,
    "context": None, "conv_layout": True, "max_period": None, "gating": "none", "norm": "layer_norm",
    "positional_embedding": "rope", "dim_feedforward": None, "input_dimension": None,
    "output_dimensions": None,
}  # fmt: skip


def _check_section(name: str, section: Any, keys: Mapping[str, Any]) -> None:
    if not isinstance(section, Mapping):
        raise CheckpointError(f"mimi config: '{name}' must be an object, got {type(section).__name__}")
    for key, required in keys.items():
        if key not in section:
            raise CheckpointError(f"mimi config: missing key '{name}.{key}'")
        if required is not None and section[key] != required:
            raise CheckpointError(
                f"mimi config: '{name}.{key}' = {section[key]!r} is not supported (only {required!r})"
            )
    for key in section:
        if key not in keys:
            raise CheckpointError(f"mimi config: unknown key '{name}.{key}'")


@dataclass(frozen=True)
class MimiConfig:
    """Mimi hyper-parameters, in the layout of moshi's `mimi_config` json (`mimi_config_name`)."""

    sample_rate: int
    channels: int
    frame_rate: float
    seanet: Mapping[str, Any]
    quantizer: Mapping[str, Any]
    transformer: Mapping[str, Any]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MimiConfig:
        for key in ("sample_rate", "channels", "frame_rate", "seanet", "quantizer", "transformer"):
            if key not in d:
                raise CheckpointError(f"mimi config: missing key '{key}'")
        unknown = set(d) - {"sample_rate", "channels", "frame_rate", "seanet", "quantizer", "transformer"}
        if unknown:
            raise CheckpointError(f"mimi config: unknown key(s) {sorted(unknown)}")
        _check_section("seanet", d["seanet"], _SEANET_KEYS)
        _check_section("quantizer", d["quantizer"], _QUANTIZER_KEYS)
        _check_section("transformer", d["transformer"], _TRANSFORMER_KEYS)
        sn, qz, tr = d["seanet"], d["quantizer"], d["transformer"]
        dim = sn["dimension"]
        if not (qz["input_dimension"] == qz["output_dimension"] == tr["input_dimension"] == dim):
            raise CheckpointError(
                "mimi config: quantizer/transformer dimensions differ from seanet.dimension"
            )
        if tr["d_model"] != dim or list(tr["output_dimensions"]) != [dim]:
            raise CheckpointError(
                "mimi config: projected transformers (d_model != dimension) are not supported"
            )
        if sn["channels"] != d["channels"]:
            raise CheckpointError("mimi config: seanet.channels differs from channels")
        return cls(
            sample_rate=int(d["sample_rate"]),
            channels=int(d["channels"]),
            frame_rate=float(d["frame_rate"]),
            seanet=_freeze(copy.deepcopy(dict(sn))),
            quantizer=_freeze(copy.deepcopy(dict(qz))),
            transformer=_freeze(copy.deepcopy(dict(tr))),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "frame_rate": self.frame_rate,
            "seanet": _thaw(self.seanet),
            "quantizer": _thaw(self.quantizer),
            "transformer": _thaw(self.transformer),
        }


_REAL: dict[str, Any] = {
    "sample_rate": 24000,
    "channels": 1,
    "frame_rate": 12.5,
    "seanet": {
        "channels": 1, "dimension": 512, "causal": True, "n_filters": 64, "n_residual_layers": 1,
        "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
        "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
        "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True,
    },
    "quantizer": {"dimension": 256, "n_q": 32, "bins": 2048, "input_dimension": 512, "output_dimension": 512},
    "transformer": {
        "d_model": 512, "num_heads": 8, "num_layers": 8, "causal": True, "layer_scale": 0.01, "context": 250,
        "conv_layout": True, "max_period": 10000, "gating": "none", "norm": "layer_norm",
        "positional_embedding": "rope", "dim_feedforward": 2048, "input_dimension": 512,
        "output_dimensions": [512],
    },
}  # fmt: skip
REAL_MIMI_CONFIG = MimiConfig.from_dict(_REAL)


def _tiny_dict() -> dict[str, Any]:
    d = copy.deepcopy(_REAL)
    d["seanet"].update(n_filters=4, dimension=32)
    d["quantizer"].update(dimension=16, input_dimension=32, output_dimension=32)
    d["transformer"].update(
        d_model=32, num_heads=4, num_layers=2, dim_feedforward=64, input_dimension=32, output_dimensions=[32]
    )
    return d


TINY_MIMI_CONFIG = MimiConfig.from_dict(_tiny_dict())


# ----------------------------------------------------------------------------------------------
# Streaming state


class _StreamState:
    """Preallocated streaming buffers of a fixed batch, one set per block, accessed for the current rows.

    `rows` is a slice when the selected rows are contiguous, so reads are views and writes copy in place;
    otherwise it is an index tensor (gather on read, scatter on write).
    """

    def __init__(self, batch_size: int, device: torch.device) -> None:
        self.batch_size = batch_size
        self.device = device
        self.buffers: dict[Hashable, torch.Tensor] = {}
        self.rows: slice | torch.Tensor = slice(0, batch_size)
        self.index = torch.arange(batch_size, device=device)

    def add(self, key: Hashable, shape: Sequence[int], dtype: torch.dtype) -> None:
        self.buffers[key] = torch.zeros((self.batch_size, *shape), dtype=dtype, device=self.device)

    def select(self, rows: Sequence[int] | torch.Tensor) -> int:
        ids = [int(r) for r in (rows.tolist() if isinstance(rows, torch.Tensor) else rows)]
        if not ids or len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= self.batch_size:
            raise ValueError(f"rows must be distinct indices in [0, {self.batch_size}), got {ids}")
        self.index = torch.tensor(ids, dtype=torch.long, device=self.device)
        contiguous = ids == list(range(ids[0], ids[0] + len(ids)))
        self.rows = slice(ids[0], ids[0] + len(ids)) if contiguous else self.index
        return len(ids)

    def read(self, key: Hashable) -> torch.Tensor:
        return self.buffers[key][self.rows]

    def write(self, key: Hashable, value: torch.Tensor) -> None:
        self.buffers[key][self.rows] = value

    def write_cells(self, key: Hashable, cells: torch.Tensor, value: torch.Tensor) -> None:
        """Write `value` [n, t, ...] at positions `cells` [n, t] of dim 2 (a ring cache) of the rows."""
        self.buffers[key][self.index[:, None], :, cells] = value

    def clear(self) -> None:
        for buf in self.buffers.values():
            buf[self.rows] = 0

    def first_rows(self, span: int, advance: torch.Tensor) -> _MaskedRows:
        """The first `span` rows, every one computed, only those with `advance` [span] bool written
        back: static shapes, so a decode over a span compiles (the rows not due keep their state)."""
        return _MaskedRows(self.buffers, span, advance)


class _MaskedRows:
    """The `_StreamState` interface on rows 0..span-1 whose writes keep the old value where `advance`
    is False."""

    def __init__(self, buffers: dict[Hashable, torch.Tensor], span: int, advance: torch.Tensor) -> None:
        self.buffers = buffers
        self.rows = slice(0, span)
        self.index = torch.arange(span, device=advance.device)
        self.advance = advance

    def _keep(self, value: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return torch.where(self.advance.view(-1, *(1,) * (value.dim() - 1)), value, old)

    def read(self, key: Hashable) -> torch.Tensor:
        return self.buffers[key][self.rows]

    def write(self, key: Hashable, value: torch.Tensor) -> None:
        buf = self.buffers[key]
        buf[self.rows] = self._keep(value, buf[self.rows])

    def write_cells(self, key: Hashable, cells: torch.Tensor, value: torch.Tensor) -> None:
        buf = self.buffers[key]
        where = (self.index[:, None], slice(None), cells)
        buf[where] = self._keep(value, buf[where])


_StreamLike = _StreamState | _MaskedRows


# ----------------------------------------------------------------------------------------------
# Building blocks, named like the checkpoint


class _CausalConv1d(nn.Module):
    """`<name>.conv.conv.{weight,bias}`: a causal conv; the left context is zeros (or the first sample)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        replicate: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Module()
        self.conv.conv = nn.Conv1d(cin, cout, kernel, stride, dilation=dilation, groups=groups, bias=bias)
        self.context = (kernel - 1) * dilation + 1 - stride  # input samples carried to the next chunk
        self.replicate = replicate

    def init_state(self, state: _StreamState) -> None:
        if self.replicate:  # only the encoder's downsampling uses it, and we encode one-shot only
            raise NotImplementedError("streaming a replicate-padded convolution")
        if self.context:
            state.add(self, (self.conv.conv.in_channels, self.context), self.conv.conv.weight.dtype)

    def forward(self, x: torch.Tensor, state: _StreamLike | None = None) -> torch.Tensor:
        if not self.context:
            return self.conv.conv(x)
        if state is not None:
            previous = state.read(self)
        elif self.replicate:
            previous = x[..., :1].expand(-1, -1, self.context)
        else:
            previous = x.new_zeros(x.shape[0], x.shape[1], self.context)
        x = torch.cat([previous, x], dim=-1)
        if state is not None:
            state.write(self, x[..., x.shape[-1] - self.context :])
        return self.conv.conv(x)


class _CausalConvTranspose1d(nn.Module):
    """`<name>.convtr.convtr.{weight,bias}`: a causal transposed conv; the last kernel-stride output
    samples are incomplete: one-shot drops them, streaming carries them into the next chunk."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1, bias: bool = True
    ) -> None:
        super().__init__()
        self.convtr = nn.Module()
        self.convtr.convtr = nn.ConvTranspose1d(cin, cout, kernel, stride, groups=groups, bias=bias)
        self.overlap = kernel - stride

    def init_state(self, state: _StreamState) -> None:
        if self.overlap:
            state.add(self, (self.convtr.convtr.out_channels, self.overlap), self.convtr.convtr.weight.dtype)

    def forward(self, x: torch.Tensor, state: _StreamLike | None = None) -> torch.Tensor:
        conv, n = self.convtr.convtr, self.overlap
        y = conv(x)
        if not n:
            return y
        if state is not None:
            y[..., :n] += state.read(self)
            tail = y[..., -n:]
            # The next chunk adds the bias to these samples again.
            state.write(self, tail - conv.bias[:, None] if conv.bias is not None else tail)
        return y[..., :-n]


class _ELU(nn.ELU):
    """ELU that accepts (and ignores) the stream state, so a SEANet stack is a plain loop."""

    def forward(self, x: torch.Tensor, state: _StreamLike | None = None) -> torch.Tensor:
        return super().forward(x)


class _ResBlock(nn.Module):
    """`<name>.block.{1,3}`: x + conv1x1(elu(conv_k(elu(x)))) (identity skip)."""

    def __init__(self, dim: int, hidden: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            [
                _ELU(),
                _CausalConv1d(dim, hidden, kernel, dilation=dilation),
                _ELU(),
                _CausalConv1d(hidden, dim, 1),
            ]
        )

    def forward(self, x: torch.Tensor, state: _StreamLike | None = None) -> torch.Tensor:
        h = x
        for layer in self.block:
            h = layer(h, state)
        return x + h


class _SEANet(nn.Module):
    """`encoder.model.{i}` / `decoder.model.{i}`."""

    def __init__(self, sn: Mapping[str, Any], decoder: bool) -> None:
        super().__init__()
        nf, dim, ch = int(sn["n_filters"]), int(sn["dimension"]), int(sn["channels"])
        ratios = [int(r) for r in sn["ratios"]]
        ks, rk, lk = int(sn["kernel_size"]), int(sn["residual_kernel_size"]), int(sn["last_kernel_size"])
        compress, base = int(sn["compress"]), int(sn["dilation_base"])

        def res_blocks(width: int) -> list[nn.Module]:
            return [
                _ResBlock(width, width // compress, rk, base**j) for j in range(int(sn["n_residual_layers"]))
            ]

        layers: list[nn.Module]
        if decoder:
            mult = 2 ** len(ratios)
            layers = [_CausalConv1d(dim, mult * nf, ks)]
            for r in ratios:
                layers += [_ELU(), _CausalConvTranspose1d(mult * nf, mult * nf // 2, 2 * r, r)]
                mult //= 2
                layers += res_blocks(mult * nf)
            layers += [_ELU(), _CausalConv1d(nf, ch, lk)]
        else:
            mult = 1
            layers = [_CausalConv1d(ch, nf, ks)]
            for r in reversed(ratios):
                layers += res_blocks(mult * nf)
                layers += [_ELU(), _CausalConv1d(mult * nf, 2 * mult * nf, 2 * r, r)]
                mult *= 2
            layers += [_ELU(), _CausalConv1d(mult * nf, dim, lk)]
        self.model = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, state: _StreamLike | None = None) -> torch.Tensor:
        for layer in self.model:
            x = layer(x, state)
        return x


def _rope(x: torch.Tensor, positions: torch.Tensor, max_period: float) -> torch.Tensor:
    """Interleaved rotary embedding of x [B, H, T, D] at absolute positions [B, T]."""
    d = x.shape[-1]
    freqs = torch.exp(
        torch.arange(d // 2, device=x.device, dtype=torch.float32) * (-math.log(max_period) * 2 / d)
    )
    angle = freqs * positions.float()[:, None, :, None]
    cos, sin = torch.cos(angle), torch.sin(angle)
    xr, xi = x.unflatten(-1, (-1, 2)).float().unbind(-1)
    return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2).to(x.dtype)


class _Attention(nn.Module):
    """`self_attn.{in_proj_weight, out_proj.weight}`: causal self-attention over a `context` window,
    streamed through a ring KV cache of `context` cells (position p lives in cell p % context)."""

    def __init__(self, d: int, heads: int, context: int, max_period: float) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.out_proj = nn.Linear(d, d, bias=False)
        self.heads, self.context, self.max_period = heads, context, max_period

    def init_state(self, state: _StreamState) -> None:
        shape = (self.heads, self.context, self.out_proj.in_features // self.heads)
        state.add((self, "k"), shape, self.in_proj_weight.dtype)
        state.add((self, "v"), shape, self.in_proj_weight.dtype)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, state: _StreamLike | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight).view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, pos, self.max_period), _rope(k, pos, self.max_period)
        if state is None:
            pos_k = pos
        else:
            if t > self.context:
                raise ValueError(f"at most {self.context} positions per streaming step, got {t}")
            cells = pos % self.context
            state.write_cells((self, "k"), cells, k.transpose(1, 2))
            state.write_cells((self, "v"), cells, v.transpose(1, 2))
            k, v = state.read((self, "k")), state.read((self, "v"))
            last = pos[:, -1:]
            # Position held by each cell; negative: never written since the row's reset.
            pos_k = last - (last - torch.arange(self.context, device=x.device)) % self.context
        delta = pos[:, :, None] - pos_k[:, None, :]
        mask = (pos_k[:, None, :] >= 0) & (delta >= 0) & (delta < self.context)
        out = F.scaled_dot_product_attention(q, k, v, mask[:, None])
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class _LayerScale(nn.Module):
    def __init__(self, d: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((d,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class _TransformerLayer(nn.Module):
    def __init__(self, tr: Mapping[str, Any]) -> None:
        super().__init__()
        d, ff = int(tr["d_model"]), int(tr["dim_feedforward"])
        self.self_attn = _Attention(d, int(tr["num_heads"]), int(tr["context"]), float(tr["max_period"]))
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.linear1 = nn.Linear(d, ff, bias=False)
        self.linear2 = nn.Linear(ff, d, bias=False)
        scale = tr["layer_scale"]
        self.layer_scale_1 = _LayerScale(d, scale) if scale is not None else nn.Identity()
        self.layer_scale_2 = _LayerScale(d, scale) if scale is not None else nn.Identity()

    def forward(self, x: torch.Tensor, pos: torch.Tensor, state: _StreamLike | None) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), pos, state))
        return x + self.layer_scale_2(self.linear2(F.gelu(self.linear1(self.norm2(x)))))


class _Transformer(nn.Module):
    """`<name>.transformer.layers.{i}`: pre-norm causal transformer with RoPE, on [B, C, T] tensors."""

    def __init__(self, tr: Mapping[str, Any]) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(_TransformerLayer(tr) for _ in range(int(tr["num_layers"])))

    def init_state(self, state: _StreamState) -> None:
        state.add(self, (), torch.long)  # absolute position of the row's next frame
        for layer in self.transformer.layers:
            layer.self_attn.init_state(state)

    def forward(self, x: torch.Tensor, state: _StreamLike | None = None) -> torch.Tensor:
        x = x.transpose(1, 2)
        b, t, _ = x.shape
        start = state.read(self) if state is not None else torch.zeros(b, dtype=torch.long, device=x.device)
        pos = start[:, None] + torch.arange(t, device=x.device)
        for layer in self.transformer.layers:
            x = layer(x, pos, state)
        if state is not None:
            state.write(self, pos[:, -1] + 1)
        return x.transpose(1, 2)


class _Codebook(nn.Module):
    """`_codebook.{_initialized, cluster_usage, embedding_sum}`: EMA statistics of the centroids."""

    def __init__(self, bins: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("_initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))
        self.register_buffer("embedding", torch.zeros(bins, dim), persistent=False)

    def refresh(self) -> None:
        self.embedding = self.embedding_sum / self.cluster_usage.clamp(min=1e-5)[:, None]


class _RVQ(nn.Module):
    """`rvq_{first,rest}`: 1x1 projections around a greedy residual vector quantizer."""

    def __init__(self, n: int, dim: int, qdim: int, bins: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(dim, qdim, 1, bias=False)
        self.output_proj = nn.Conv1d(qdim, dim, 1, bias=False)
        self.vq = nn.Module()
        self.vq.layers = nn.ModuleList()
        for _ in range(n):
            layer = nn.Module()
            layer._codebook = _Codebook(bins, qdim)
            self.vq.layers.append(layer)

    def codebook(self, i: int) -> torch.Tensor:
        return self.vq.layers[i]._codebook.embedding

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n, T] -> latent [B, dim, T]. A code -1 is an absent codebook (it adds exactly 0),
        so streams with fewer codebooks decode in one batch with the others."""
        total = self._lookup(codes, 0)
        for i in range(1, codes.shape[1]):
            total = total + self._lookup(codes, i)
        return self.output_proj(total.transpose(1, 2))

    def _lookup(self, codes: torch.Tensor, i: int) -> torch.Tensor:
        c = codes[:, i]
        e = F.embedding(c.clamp(min=0), self.codebook(i))
        return torch.where((c >= 0)[..., None], e, torch.zeros_like(e))

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """latent [B, dim, T] -> codes [B, n, T], each level quantizing what the previous ones left."""
        residual = self.input_proj(x)
        b, qdim, t = residual.shape
        codes = []
        for i in range(n):
            cb = self.codebook(i)
            flat = residual.transpose(1, 2).reshape(-1, qdim)
            # Same distance op and shapes as the reference, so near-ties resolve identically.
            idx = torch.cdist(flat[None], cb[None], p=2)[0].argmin(dim=-1).view(b, t)
            residual = residual - F.embedding(idx, cb).transpose(1, 2)
            codes.append(idx)
        return torch.stack(codes, dim=1)


class _SplitRVQ(nn.Module):
    """`quantizer.rvq_first` (codebook 0, semantic) + `quantizer.rvq_rest` (codebooks 1..n_q-1)."""

    def __init__(self, qz: Mapping[str, Any]) -> None:
        super().__init__()
        n_q, dim, qdim, bins = (
            int(qz["n_q"]),
            int(qz["input_dimension"]),
            int(qz["dimension"]),
            int(qz["bins"]),
        )
        self.rvq_first = _RVQ(1, dim, qdim, bins)
        self.rvq_rest = _RVQ(n_q - 1, dim, qdim, bins)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.rvq_first.decode(codes[:, :1])
        if codes.shape[1] > 1:
            x = x + self.rvq_rest.decode(codes[:, 1:])
        return x

    def encode(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        codes = self.rvq_first.encode(x, 1)
        if n_q > 1:  # both quantizers start from the same latent
            codes = torch.cat([codes, self.rvq_rest.encode(x, n_q - 1)], dim=1)
        return codes


# ----------------------------------------------------------------------------------------------
# The codec


class MimiModel(nn.Module):
    """Mimi: SEANet + transformer + split RVQ, both directions. `state_dict()` uses checkpoint names."""

    def __init__(self, config: MimiConfig = REAL_MIMI_CONFIG) -> None:
        super().__init__()
        self.config = config
        sn, qz, tr = config.seanet, config.quantizer, config.transformer
        self.sample_rate = config.sample_rate
        self.frame_rate = config.frame_rate
        self.frame_size = int(config.sample_rate / config.frame_rate)
        self.num_codebooks = int(qz["n_q"])
        self.cardinality = int(qz["bins"])
        hop = math.prod(int(r) for r in sn["ratios"])
        if self.frame_size % hop:
            raise CheckpointError(
                f"mimi config: frame size {self.frame_size} is not a multiple of the hop {hop}"
            )
        stride = self.frame_size // hop  # latent frames of the SEANet per codec frame
        dim = int(sn["dimension"])

        self.encoder = _SEANet(sn, decoder=False)
        self.decoder = _SEANet(sn, decoder=True)
        self.encoder_transformer = _Transformer(tr)
        self.decoder_transformer = _Transformer(tr)
        self.quantizer = _SplitRVQ(qz)
        self.downsample: nn.Module | None = None
        self.upsample: nn.Module | None = None
        if stride > 1:
            self.downsample = nn.Module()
            self.downsample.conv = _CausalConv1d(dim, dim, 2 * stride, stride, bias=False, replicate=True)
            self.upsample = nn.Module()
            # Depthwise: the released model has the reference's "channel-wise upsample" quirk.
            self.upsample.convtr = _CausalConvTranspose1d(
                dim, dim, 2 * stride, stride, groups=dim, bias=False
            )
        self.register_load_state_dict_post_hook(lambda module, _: module._refresh_codebooks())

    def _codebooks(self) -> list[_Codebook]:
        return [m for m in self.modules() if isinstance(m, _Codebook)]

    def _refresh_codebooks(self) -> None:
        for cb in self._codebooks():
            cb.refresh()

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors as named in the released checkpoint (our module names are those names)."""
        return dict(self.state_dict())

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def from_safetensors(
        cls, path: str | Path, config: MimiConfig | None = None, device: str | torch.device = "cpu"
    ) -> MimiModel:
        state = load_safetensors(path)
        with torch.device("meta"):  # the checkpoint provides every tensor: skip random initialisation
            model = cls(config or REAL_MIMI_CONFIG)
        model.load_checkpoint(state, str(path))
        return model.to(device).eval().requires_grad_(False)

    def load_checkpoint(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Load every tensor of a Mimi checkpoint (fused or moshi module attention names), strictly."""
        state = _fuse_attention_names(state)
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        hint = "is it a Mimi checkpoint, and does the mimi config match it?"
        for key, shape in expected.items():
            if key not in state:
                n = sum(k not in state for k in expected)
                raise CheckpointError(
                    f"{source}: missing tensor '{key}' (expected float32 {list(shape)}; {n} missing in all); "
                    + hint
                )
            tensor = state[key]
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{source}: tensor '{key}' has shape {list(tensor.shape)}, expected {list(shape)}; "
                    + hint
                )
            if tensor.dtype != torch.float32:
                raise CheckpointError(
                    f"{source}: tensor '{key}' has dtype {tensor.dtype}, expected torch.float32"
                )
        for key in state:
            if key not in expected:
                raise CheckpointError(f"{source}: unexpected tensor '{key}' (not part of this Mimi); " + hint)
        self.load_state_dict(dict(state), assign=True)

    # -- codec ---------------------------------------------------------------------------------

    def _decode(self, codes: torch.Tensor, state: _StreamLike | None) -> torch.Tensor:
        x = self.quantizer.decode(codes)
        if self.upsample is not None:
            x = self.upsample.convtr(x, state)
        x = self.decoder_transformer(x, state)
        return self.decoder(x, state)

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 3 or not 1 <= codes.shape[1] <= self.num_codebooks or codes.is_floating_point():
            raise ValueError(
                f"codes must be an integer tensor [B, n, T] with 1 <= n <= {self.num_codebooks}, "
                f"got {codes.dtype} {list(codes.shape)}"
            )

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n, T] (the first n codebooks) -> pcm [B, 1, T * frame_size], from a fresh stream."""
        self._check_codes(codes)
        return self._decode(codes, None)

    @torch.no_grad()
    def encode(self, pcm: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """pcm [B, 1, S] -> codes [B, n_q, ceil(S / frame_size)] (the end is zero-padded to a frame)."""
        n_q = self.num_codebooks if n_q is None else n_q
        if pcm.dim() != 3 or pcm.shape[1] != self.config.channels or pcm.shape[-1] == 0:
            raise ValueError(f"pcm must be [B, {self.config.channels}, S>0], got {list(pcm.shape)}")
        if not 1 <= n_q <= self.num_codebooks:
            raise ValueError(f"n_q must be in [1, {self.num_codebooks}], got {n_q}")
        x = F.pad(pcm, (0, -pcm.shape[-1] % self.frame_size))
        x = self.encoder_transformer(self.encoder(x))
        if self.downsample is not None:
            x = self.downsample.conv(x)
        return self.quantizer.encode(x, n_q)


def _fuse_attention_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """moshi's module naming (`in_projs.0.weight`, `out_projs.0.weight`, `in_proj.weight`) -> the
    checkpoint's fused naming. Mimi attention has one weight set, so index 0 is the whole tensor."""
    renames = {".in_projs.0.weight": ".in_proj_weight", ".in_proj.weight": ".in_proj_weight",
               ".out_projs.0.weight": ".out_proj.weight"}  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for old, new in renames.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        out[key] = value
    return out


def encoder_shapes(config: MimiConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the encoder-side tensors of a Mimi checkpoint."""
    with torch.device("meta"):
        model = MimiModel(config)
    prefixes = ("encoder.", "encoder_transformer.", "downsample.")
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(prefixes)}


def random_mimi_state_dict(config: MimiConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for a whole Mimi checkpoint (checkpoint naming, float32), loadable by moshi too.

    Scales keep activations O(1) through the codec, so parity tests compare signals, not noise floors;
    codebook EMA buffers are non-degenerate (usage in [0.5, 1.5], centroids ~ N(0, 1/qdim)).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MimiModel(config).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if key.endswith("cluster_usage"):
            v = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("embedding_sum"):
            usage = out[key.replace("embedding_sum", "cluster_usage")]
            v = noise * usage[:, None] / math.sqrt(shape[1])
        elif key.endswith("_initialized"):
            v = torch.ones(shape)
        elif key.endswith(".scale"):
            v = 0.1 + 0.02 * noise
        elif ".norm" in key and key.endswith(".weight"):
            v = 1 + 0.1 * noise
        elif key.endswith(".bias"):
            v = 0.05 * noise
        elif "convtr.convtr.weight" in key:  # [cin, cout/groups, k]: each output sums ~cin*2 taps
            v = noise / math.sqrt(shape[0] * 2)
        else:  # [out, in(/groups), k...]
            v = noise / math.sqrt(math.prod(shape[1:]))
        out[key] = v.float().contiguous()
    return out


# ----------------------------------------------------------------------------------------------
# Streaming decode with per-row state


class MimiStreamingDecoder:
    """Per-row streaming decode state for a batch of independent streams (engine slots).

    Each row holds its own conv left contexts, transposed-conv overlaps, transformer ring KV cache and
    position, preallocated for `batch_size` rows. A fresh or reset row decodes exactly like a freshly
    started reference decoder, so feed it from the first valid frame on (never placeholder codes).
    """

    def __init__(self, mimi: MimiModel, batch_size: int) -> None:
        self.mimi = mimi
        param = next(mimi.parameters())
        self.state = _StreamState(batch_size, param.device)
        blocks = [mimi.decoder_transformer, mimi.decoder] + ([mimi.upsample] if mimi.upsample else [])
        for block in blocks:
            for m in block.modules():
                if isinstance(m, (_CausalConv1d, _CausalConvTranspose1d, _Transformer)):
                    m.init_state(self.state)

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def reset(self, rows: Sequence[int] | torch.Tensor) -> None:
        """Forget these rows' streams (a new session takes the slot)."""
        self.state.select(rows)
        self.state.clear()

    def decode_span(self, codes: torch.Tensor, advance: torch.Tensor) -> torch.Tensor:
        """codes [span, n_q, 1] of slots 0..span-1 -> pcm [span, frame_size] (not clamped). Every row
        is decoded (static shapes, for a compiled step); only the rows with `advance` [span] bool move
        their streams on, and only their pcm means anything."""
        return self.mimi._decode(codes, self.state.first_rows(codes.shape[0], advance))[:, 0]

    @torch.no_grad()
    def decode_step(self, codes: torch.Tensor, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """codes [len(rows), n_q, 1] -> pcm [len(rows), frame_size] (not clamped); advances only `rows`."""
        n = self.state.select(rows)
        self.mimi._check_codes(codes)
        if codes.shape[0] != n or codes.shape[-1] != 1:
            raise ValueError(f"codes must be [{n}, n_q, 1] for {n} rows, got {list(codes.shape)}")
        return self.mimi._decode(codes, self.state)[:, 0]
