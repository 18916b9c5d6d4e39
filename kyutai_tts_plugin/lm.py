"""The DSM language model: a backbone transformer over time and a depformer over codebooks.

Parameters are named exactly as in the released checkpoint (fused attention projections,
``in_proj_weight`` / ``out_proj.weight``), so ``state_dict()`` *is* the checkpoint inventory.

The model is stepped for a subset of *rows* of a fixed-size batch: each row is an engine slot with
its own position, KV cache window and conditioning, so sessions start, pause and stop independently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InvalidInputError

ZERO_TOKEN = -1  # embeds to exactly zero in every table


# ----------------------------------------------------------------------------------------------
# Small building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, compute_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.eps = eps
        self.compute_dtype = compute_dtype
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x if self.compute_dtype is None else x.to(self.compute_dtype)
        var = self.eps + torch.mean(xc * xc, dim=-1, keepdim=True)
        return (xc * (self.alpha.to(var) * torch.rsqrt(var))).to(x.dtype)


def make_norm(kind: str, dim: int) -> RMSNorm:
    if kind == "rms_norm_f32":
        return RMSNorm(dim, 1e-8, torch.float32)
    if kind == "rms_norm":
        return RMSNorm(dim, 1e-5, None)
    raise CheckpointError(f"config.json: norm '{kind}' is not supported (expected rms_norm_f32 or rms_norm)")


class Int8Weight:
    """Weight-only int8 with one scale per output row, for fast CPU matmuls (activations in bfloat16).

    Opt-in and not bit-exact: about 4x less memory traffic than float32 for the same shapes.
    """

    def __init__(self, w: torch.Tensor) -> None:
        w = w.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale)
        return y.view(*x.shape[:-1], self.q.shape[0]).to(x.dtype)


def apply_weight(x: torch.Tensor, w: torch.Tensor | Int8Weight) -> torch.Tensor:
    return w(x) if isinstance(w, Int8Weight) else F.linear(x, w)


class Linear(nn.Linear):
    """`nn.Linear` (no bias here) that switches to int8 weights after `quantize_int8`."""

    int8: Int8Weight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.int8(x) if self.int8 is not None else F.linear(x, self.weight)


class Weight(nn.Module):
    """A bare weight, so that checkpoint names such as ``out_proj.weight`` map onto modules."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))


class Gating(nn.Module):
    """Gated FFN: ``linear_out(silu(a) * b)`` where ``[a, b] = linear_in(x)``."""

    def __init__(self, dim: int, dim_feedforward: int) -> None:
        super().__init__()
        # The hidden size rule of the released models (a 21/8 shortcut when the FFN is 4x).
        hidden = (21 * dim) // 8 if dim_feedforward == 4 * dim else (2 * dim_feedforward) // 3
        self.linear_in = Linear(dim, 2 * hidden, bias=False)
        self.linear_out = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_in(x)
        a, b = h.chunk(2, dim=-1)
        return self.linear_out(F.silu(a) * b)


class Embedding(nn.Module):
    """Token table where ZERO_TOKEN embeds to 0; optional low-rank output and demuxed second stream."""

    def __init__(self, num: int, dim: int, low_rank: int | None = None, demux: bool = False) -> None:
        super().__init__()
        self.num = num
        self.demux = demux
        self.weight = nn.Parameter(torch.empty(num, low_rank or dim))
        # Checkpoints carry `low_rank` even for demuxed tables, where it is unused.
        self.low_rank = Linear(low_rank, dim, bias=False) if low_rank else None
        if demux:
            self.out1 = Linear(low_rank or dim, dim, bias=False)
            self.out2 = Linear(low_rank or dim, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        is_zero = (tokens == ZERO_TOKEN)[..., None]
        tokens = tokens.clamp(min=0)
        if self.demux:
            # A muxed value is (second + 1) * num + main, with second = -1 meaning "nothing".
            main, second = tokens % self.num, tokens // self.num - 1
            y = self.out1(F.embedding(main, self.weight))
            y2 = self.out2(F.embedding(second.clamp(min=0), self.weight))
            y = y + torch.where((second < 0)[..., None], torch.zeros_like(y2), y2)
            return torch.where(is_zero, torch.zeros_like(y), y)
        y = F.embedding(tokens, self.weight)
        y = torch.where(is_zero, torch.zeros_like(y), y)
        return self.low_rank(y) if self.low_rank is not None else y


class RopeTable:
    """Interleaved rotary embedding, angles computed in float32 from absolute positions."""

    def __init__(self, head_dim: int, max_period: float) -> None:
        # Explicit CPU: the model may be built under a `meta` device context.
        ds = torch.arange(head_dim // 2, dtype=torch.float32, device="cpu")
        self.freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [n, H, T, D]; positions: [n, T]
        angles = positions.to(torch.float32)[:, None, :, None] * self.freqs.to(x.device)
        cos, sin = torch.cos(angles), torch.sin(angles)
        xr, xi = x.unflatten(-1, (-1, 2)).float().unbind(-1)
        out = torch.stack([(xr * cos - xi * sin).to(x.dtype), (xr * sin + xi * cos).to(x.dtype)], dim=-1)
        return out.flatten(-2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled dot-product attention. On CPU in reduced precision, torch's fused kernel is several times
    slower than three plain ops for one query step, so use those there (softmax in float32), as one
    opaque op: compiled, inductor would otherwise turn them back into that fused kernel (the
    unmasked cross-attention) or into its own reduction loops (the masked self-attention), each
    about ten times slower than the plain ops at batch 8 (real-size bfloat16, torch 2.13)."""
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, mask)
    return _cpu_attention(q, k, v, mask)


@torch.library.custom_op("kyutai_tts::cpu_attention", mutates_args=())
def _cpu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


@_cpu_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def split_heads(x: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """[n, T, parts*H*D] laid out (part, head, dim) -> parts x [n, H, T, D]."""
    n, t, _ = x.shape
    return tuple(x.view(n, t, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0))


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    n, h, t, d = x.shape
    return x.transpose(1, 2).reshape(n, t, h * d)


# ----------------------------------------------------------------------------------------------
# Backbone


class SelfAttention(nn.Module):
    """Fused q/k/v projection; the depformer stacks one weight set per codebook group (`mult`)."""

    def __init__(self, dim: int, num_heads: int, mult: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.mult = mult
        self.in_proj_weight = nn.Parameter(torch.empty(mult * 3 * dim, dim))
        self.out_proj = Weight(mult * dim, dim)
        self.int8: tuple[list[Int8Weight], list[Int8Weight]] | None = None

    def w_in(self, j: int = 0) -> torch.Tensor | Int8Weight:
        if self.int8 is not None:
            return self.int8[0][j]
        w = self.in_proj_weight
        return w.view(self.mult, -1, w.shape[1])[j] if self.mult > 1 else w

    def w_out(self, j: int = 0) -> torch.Tensor | Int8Weight:
        if self.int8 is not None:
            return self.int8[1][j]
        w = self.out_proj.weight
        return w.view(self.mult, -1, w.shape[1])[j] if self.mult > 1 else w


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.out_proj = Weight(dim, dim)
        self.int8: tuple[Int8Weight, Int8Weight] | None = None

    def w_q(self) -> torch.Tensor | Int8Weight:
        return self.int8[0] if self.int8 is not None else self.in_proj_weight[: self.in_proj_weight.shape[1]]

    def w_out(self) -> torch.Tensor | Int8Weight:
        return self.int8[1] if self.int8 is not None else self.out_proj.weight

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Speaker memory [M, dim] -> keys, values [H, M, D]; computed once per voice."""
        dim = self.in_proj_weight.shape[1]
        kv = F.linear(memory[None], self.in_proj_weight[dim:])
        k, v = split_heads(kv, 2, self.num_heads)
        return k[0], v[0]


class BackboneLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, dim_feedforward: int, norm: str, cross: bool) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.self_attn = SelfAttention(dim, num_heads)
        self.norm2 = make_norm(norm, dim)
        self.gating = Gating(dim, dim_feedforward)
        self.cross_attention = CrossAttention(dim, num_heads) if cross else None
        if cross:
            self.norm_cross = nn.LayerNorm(dim, eps=1e-5)


class Depformer(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, num_layers: int, dim_feedforward: int, norm: str, num_weight_sets: int
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            layer = nn.Module()
            layer.norm1 = make_norm(norm, dim)
            layer.self_attn = SelfAttention(dim, num_heads, mult=num_weight_sets)
            layer.norm2 = make_norm(norm, dim)
            layer.gating = nn.ModuleList(Gating(dim, dim_feedforward) for _ in range(num_weight_sets))
            self.layers.append(layer)


# ----------------------------------------------------------------------------------------------
# The full model


@dataclass(frozen=True)
class LMShape:
    """The hyper-parameters of config.json that shape the network."""

    dim: int
    num_heads: int
    num_layers: int
    dim_feedforward: int
    norm: str
    context: int
    max_period: float
    card: int
    text_card: int
    text_card_out: int  # rows of the text head: the actions the model predicts (5 for the 0.75B model)
    n_q: int
    dep_q: int
    delays: tuple[int, ...]
    cross_attention: bool
    demux_second_stream: bool
    depformer_dim: int
    depformer_num_heads: int
    depformer_num_layers: int
    depformer_dim_feedforward: int
    depformer_low_rank_embeddings: int | None
    depformer_schedule: tuple[int, ...]
    conditioners: Mapping[str, Any]

    @staticmethod
    def from_config(cfg: Mapping[str, Any]) -> LMShape:
        """Build from a config.json dict (missing keys raise KeyError, checked by the loader)."""
        dim = int(cfg["dim"])
        dep_q = int(cfg["dep_q"])
        dep_dim = int(cfg["depformer_dim"])
        dep_ff = cfg.get("depformer_dim_feedforward")
        schedule = cfg.get("depformer_weights_per_step_schedule") or list(range(dep_q))
        if cfg.get("positional_embedding", "rope") != "rope":
            raise CheckpointError("config.json: only positional_embedding 'rope' is supported")
        if cfg.get("depformer_pos_emb", "none") != "none":
            raise CheckpointError("config.json: only depformer_pos_emb 'none' is supported")
        if not cfg.get("depformer_multi_linear", False) or not cfg.get("depformer_weights_per_step", False):
            raise CheckpointError("config.json: the depformer must use multi_linear and weights_per_step")
        if cfg.get("gating", "silu") != "silu":
            raise CheckpointError("config.json: only gating 'silu' is supported")
        return LMShape(
            dim=dim,
            num_heads=int(cfg["num_heads"]),
            num_layers=int(cfg["num_layers"]),
            dim_feedforward=int(float(cfg.get("hidden_scale", 4)) * dim),
            norm=str(cfg.get("norm", "rms_norm_f32")),
            context=int(cfg["context"]),
            max_period=float(cfg.get("max_period", 10000)),
            card=int(cfg["card"]),
            text_card=int(cfg["text_card"]),
            text_card_out=int(cfg.get("text_card_out") or cfg["text_card"]),
            n_q=int(cfg["n_q"]),
            dep_q=dep_q,
            delays=tuple(int(d) for d in cfg["delays"]),
            cross_attention=bool(cfg.get("cross_attention", False)),
            demux_second_stream=bool(cfg.get("demux_second_stream", False)),
            depformer_dim=dep_dim,
            depformer_num_heads=int(cfg.get("depformer_num_heads", cfg["num_heads"])),
            depformer_num_layers=int(cfg.get("depformer_num_layers", cfg["num_layers"])),
            depformer_dim_feedforward=int(
                dep_ff if dep_ff is not None else float(cfg["hidden_scale"]) * dep_dim
            ),
            depformer_low_rank_embeddings=cfg.get("depformer_low_rank_embeddings"),
            depformer_schedule=tuple(int(s) for s in schedule),
            conditioners=cfg.get("conditioners") or {},
        )


class LMModel(nn.Module):
    def __init__(self, shape: LMShape) -> None:
        super().__init__()
        s = self.shape = shape
        if len(s.delays) != s.n_q + 1:
            raise CheckpointError(
                f"config.json: 'delays' has {len(s.delays)} entries, expected n_q + 1 = {s.n_q + 1}"
            )
        self.emb = nn.ModuleList(Embedding(s.card + 1, s.dim) for _ in range(s.n_q))
        self.text_emb = Embedding(s.text_card + 1, s.dim, demux=s.demux_second_stream)
        self.text_linear = Linear(s.dim, s.text_card_out, bias=False)
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            BackboneLayer(s.dim, s.num_heads, s.dim_feedforward, s.norm, s.cross_attention)
            for _ in range(s.num_layers)
        )
        self.out_norm = make_norm(s.norm, s.dim)
        num_sets = max(s.depformer_schedule) + 1
        self.depformer_in = nn.ModuleList(Linear(s.dim, s.depformer_dim, bias=False) for _ in range(num_sets))
        low_rank = s.depformer_low_rank_embeddings
        self.depformer_emb = nn.ModuleList(
            Embedding(s.card + 1, s.depformer_dim, low_rank=low_rank) for _ in range(s.dep_q - 1)
        )
        self.depformer_text_emb = Embedding(
            s.text_card + 1, s.depformer_dim, low_rank=low_rank, demux=s.demux_second_stream
        )
        self.depformer = Depformer(
            s.depformer_dim,
            s.depformer_num_heads,
            s.depformer_num_layers,
            s.depformer_dim_feedforward,
            s.norm,
            num_sets,
        )
        self.linears = nn.ModuleList(Linear(s.depformer_dim, s.card, bias=False) for _ in range(s.dep_q))
        self.condition_provider = nn.Module()
        self.condition_provider.conditioners = nn.ModuleDict(
            {name: _make_conditioner(name, c, s.dim) for name, c in s.conditioners.items()}
        )
        self.rope = RopeTable(s.dim // s.num_heads, s.max_period)

    # -- conditioning -------------------------------------------------------------------------

    def cfg_values(self) -> list[float]:
        cfg = self.shape.conditioners.get("cfg")
        return [float(v) for v in cfg["lut"]["possible_values"]] if cfg else []

    def condition_sum(self, cfg_coef: float | None) -> torch.Tensor:
        """The summed ("sum"-fused) conditions, [dim], float32."""
        total = torch.zeros(self.shape.dim, dtype=torch.float32, device=self._device)
        conds = self.condition_provider.conditioners
        if "control" in conds:
            total = total + _lut_condition(conds["control"], self.shape.conditioners["control"], "ok")
        if "cfg" in conds:
            key = None if cfg_coef is None else format(cfg_coef, ".1f")
            total = total + _lut_condition(conds["cfg"], self.shape.conditioners["cfg"], key)
        return total

    def speaker_memory(self, voices: Sequence[torch.Tensor], max_speakers: int) -> torch.Tensor:
        """Cross-attention memory from voice embeddings ([1, D, T] each, slot i = voice i): [S*T, dim]."""
        cond = self.condition_provider.conditioners["speaker_wavs"]
        first = voices[0]
        steps = first.shape[-1]
        x = torch.zeros(max_speakers, steps, first.shape[1], dtype=torch.float32, device=self._device)
        mask = torch.zeros(max_speakers, steps, dtype=torch.float32, device=self._device)
        for i, v in enumerate(voices):
            x[i] = v[0].t().to(x)
            mask[i] = 1.0
        proj = F.linear(x.view(-1, x.shape[-1]), cond.output_proj.weight.float())
        m = mask.view(-1, 1)
        memory = proj * m + cond.learnt_padding.float()[0] * (1 - m)
        return memory + sinusoidal_embedding(memory.shape[0], memory.shape[1], memory.device)

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        mem = memory.to(self._dtype)
        return [layer.cross_attention.memory_kv(mem) for layer in self.transformer.layers]

    # The text embedding table is never quantized, so it tells the model's device and dtype.
    @property
    def _device(self) -> torch.device:
        return self.text_emb.weight.device

    @property
    def _dtype(self) -> torch.dtype:
        return self.text_emb.weight.dtype


def sinusoidal_embedding(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """[cos | sin] positional embedding of the fuser (divisor half_dim - 1, as trained)."""
    half = dim // 2
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    adim = torch.arange(half, dtype=torch.float32, device=device)[None]
    phase = pos / (torch.tensor(10000.0, device=device) ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


def _make_conditioner(name: str, c: Mapping[str, Any], dim: int) -> nn.Module:
    m = nn.Module()
    kind = c.get("type")
    if kind == "lut":
        lut = c["lut"]
        m.embed = nn.Embedding(int(lut["n_bins"]) + 1, int(lut["dim"]))
        m.output_proj = Linear(int(lut["dim"]), dim, bias=False)
    elif kind == "tensor":
        m.output_proj = Linear(int(c["tensor"]["dim"]), dim, bias=False)
    else:
        raise CheckpointError(f"config.json: conditioner '{name}' has unsupported type '{kind}'")
    m.learnt_padding = nn.Parameter(torch.empty(1, 1, dim))
    return m


def _lut_condition(module: nn.Module, c: Mapping[str, Any], value: str | None) -> torch.Tensor:
    lut = c["lut"]
    values = list(lut["possible_values"])
    if value is None:  # "no condition": the learnt padding
        return module.learnt_padding.float()[0, 0]
    idx = values.index(value)
    return F.linear(module.embed.weight[idx].float(), module.output_proj.weight.float())


# ----------------------------------------------------------------------------------------------
# Batched stepping with per-slot state


class LMState:
    """Per-slot caches of the backbone: self-attention KV (ring buffers of `context` positions) and,
    for a model with speaker cross-attention, each slot's voice keys/values (copied in when a session
    joins, as the reference keeps one cross-attention memory per batch row), so a step over the
    first n slots is a fixed-shape computation on views of these tensors."""

    def __init__(self, model: LMModel, batch_size: int) -> None:
        s = model.shape
        dev, dt = model._device, model._dtype
        head = s.dim // s.num_heads
        self.batch_size = batch_size
        # One tensor per layer, never views of a shared one: a compiled step then writes each step's
        # cells in place (a write through a view of a graph input is functionalized into a copy of
        # the whole layer's cache, every layer, every step).
        layer_shape = (batch_size, s.num_heads, s.context, head)
        self.k = [torch.zeros(layer_shape, device=dev, dtype=dt) for _ in range(s.num_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        # Absolute position held in each cache cell; -1 = empty. Shared by all layers.
        self.cell_pos = torch.full((batch_size, s.context), -1, dtype=torch.long, device=dev)
        # [layers, batch, H, M, D] each, allocated at the first voice (M depends on the voices).
        self.cross_k: torch.Tensor | None = None
        self.cross_v: torch.Tensor | None = None

    def reset(self, row: int, cross: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Empty `row`'s caches for a new session; `cross`: its voice's per-layer (keys, values) [H, M, D]."""
        self.cell_pos[row] = -1
        if cross is None:
            return
        keys = torch.stack([k for k, _ in cross])
        values = torch.stack([v for _, v in cross])
        if self.cross_k is None:
            shape = (keys.shape[0], self.batch_size, *keys.shape[1:])
            self.cross_k = keys.new_zeros(shape)
            self.cross_v = values.new_zeros(shape)
        assert self.cross_v is not None
        if keys.shape[1:] != self.cross_k.shape[2:]:
            raise InvalidInputError(
                f"this voice's speaker memory has shape {list(keys.shape[1:])}, the other voices' "
                f"{list(self.cross_k.shape[2:])}: use voice files made for this model"
            )
        self.cross_k[:, row] = keys
        self.cross_v[:, row] = values


def backbone_step(
    model: LMModel,
    state: LMState,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cond_sum: torch.Tensor,
    cells: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step of the backbone for the first n = len(tokens) slots.

    tokens: [n, 1 + n_q] input tokens; positions: [n] absolute step of each row; cond_sum: [n, dim].
    cells: how many cache cells the attention reads (default: the whole ring). Position p sits in
    cell p % context, so while every position is below `cells` the cells past it are all empty: a
    short reply then reads a fraction of the cache (the caller passes a few fixed sizes).
    Every row is computed; a row that is not really stepping (masked by the caller) only writes the
    cache cell of `positions`, which its next real step at that position overwrites.
    Returns (hidden [n, dim] after out_norm, text logits [n, text_card_out]).
    """
    s = model.shape
    n = tokens.shape[0]
    x: torch.Tensor | None = None
    for k in range(s.n_q):
        e = model.emb[k](tokens[:, 1 + k])
        x = e if x is None else x + e
    t = model.text_emb(tokens[:, 0])
    x = t if x is None else x + t
    x = (x + cond_sum.to(x)).view(n, 1, s.dim)

    rows = torch.arange(n, device=tokens.device)
    cell = positions % s.context
    state.cell_pos[rows, cell] = positions
    cells = s.context if cells is None else cells
    cell_pos = state.cell_pos[:n, :cells]
    delta = positions[:, None] - cell_pos
    mask = ((cell_pos >= 0) & (delta >= 0) & (delta < s.context))[:, None, None, :]
    pos_q = positions[:, None]

    for li, layer in enumerate(model.transformer.layers):
        h = layer.norm1(x)
        q, k, v = split_heads(apply_weight(h, layer.self_attn.w_in()), 3, s.num_heads)
        q, k = model.rope(q, pos_q), model.rope(k, pos_q)
        k_cache, v_cache = state.k[li], state.v[li]
        k_cache[rows, :, cell] = k[:, :, 0]
        v_cache[rows, :, cell] = v[:, :, 0]
        a = attention(q, k_cache[:n, :, :cells], v_cache[:n, :, :cells], mask)
        x = x + apply_weight(merge_heads(a), layer.self_attn.w_out())
        if layer.cross_attention is not None:
            assert state.cross_k is not None and state.cross_v is not None, "no voice joined"
            h = layer.norm_cross(x)
            ca = layer.cross_attention
            q = split_heads(apply_weight(h, ca.w_q()), 1, s.num_heads)[0]
            a = attention(q, state.cross_k[li, :n], state.cross_v[li, :n])
            x = x + apply_weight(merge_heads(a), ca.w_out())
        x = x + layer.gating(layer.norm2(x))
    h = model.out_norm(x)[:, 0]
    return h, model.text_linear(h)


@torch.no_grad()
def depformer_step(
    model: LMModel,
    hidden: torch.Tensor,
    text_tokens: torch.Tensor,
    n_q: int,
    sample: Any,
) -> torch.Tensor:
    """Generate audio codebooks 0..n_q-1 for each row, one after the other.

    hidden: [n, dim]; text_tokens: [n] the (muxed) text token fed at this step;
    sample(q, logits [n, card]) -> tokens [n] picks each codebook (sampling is the caller's policy).
    Returns [n, n_q] tokens.
    """
    s = model.shape
    n = hidden.shape[0]
    dep = model.depformer
    heads = s.depformer_num_heads
    d = s.depformer_dim
    # Preallocated KV cache over the codebook axis: codebook q writes cell q and attends to 0..q.
    cache_shape = (n, heads, max(n_q, 1), d // heads)
    keys = [hidden.new_empty(cache_shape) for _ in dep.layers]
    values = [hidden.new_empty(cache_shape) for _ in dep.layers]
    prev = text_tokens
    out = []
    projected: dict[int, torch.Tensor] = {}  # codebooks sharing a weight set share this projection
    for q in range(n_q):
        j = s.depformer_schedule[q]
        if j not in projected:
            projected[j] = model.depformer_in[j](hidden)
        x = projected[j]
        emb = model.depformer_text_emb if q == 0 else model.depformer_emb[q - 1]
        x = (x + emb(prev)).view(n, 1, d)
        for li, layer in enumerate(dep.layers):
            h = layer.norm1(x)
            qq, kk, vv = split_heads(apply_weight(h, layer.self_attn.w_in(j)), 3, heads)
            keys[li][:, :, q] = kk[:, :, 0]
            values[li][:, :, q] = vv[:, :, 0]
            a = attention(qq, keys[li][:, :, : q + 1], values[li][:, :, : q + 1])
            x = x + apply_weight(merge_heads(a), layer.self_attn.w_out(j))
            x = x + layer.gating[j](layer.norm2(x))
        logits = model.linears[q](x[:, 0])
        prev = sample(q, logits)
        out.append(prev)
    return torch.stack(out, dim=1) if out else torch.empty(n, 0, dtype=torch.long, device=hidden.device)


# ----------------------------------------------------------------------------------------------
# Loading


def _moshi_name_to_checkpoint(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept moshi's per-module attention names (``in_projs.{i}.weight``) by fusing them."""
    out: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        for part, fused in ((".in_projs.", ".in_proj_weight"), (".out_projs.", ".out_proj.weight")):
            if part in key and key.endswith(".weight"):
                prefix, rest = key.split(part, 1)
                grouped.setdefault(prefix + fused, {})[int(rest.split(".")[0])] = value
                break
        else:
            if key.endswith(".in_proj.weight"):
                key = key[: -len(".in_proj.weight")] + ".in_proj_weight"
            out[key] = value
    for key, parts in grouped.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    return out


def load_lm(
    model: LMModel,
    state: Mapping[str, torch.Tensor],
    source: str,
    dtype: torch.dtype,
    device: torch.device | str,
) -> LMModel:
    """Load checkpoint tensors into `model` (built on any device), checking every key and shape.

    Conditioners stay float32 as in the reference; everything else is cast to `dtype`.
    """
    state = _moshi_name_to_checkpoint(state)
    expected = dict(model.state_dict())
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor '{missing[0]}' ({len(missing)} missing in all). The file does not "
            "match config.json: check that both come from the same checkpoint."
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor '{unexpected[0]}' not described by config.json.")
    loaded: dict[str, torch.Tensor] = {}
    for key, ref in expected.items():
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor '{key}' has shape {list(t.shape)}, config.json implies {list(ref.shape)}."
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor '{key}' has dtype {t.dtype}, expected a float dtype.")
        target = torch.float32 if key.startswith("condition_provider.") else dtype
        loaded[key] = t.to(device=device, dtype=target)
    model.load_state_dict(loaded, assign=True)
    return model.eval()


def random_lm_state_dict(config: Mapping[str, Any] | Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in checkpoint naming and dtypes (bf16, float32 conditioners), for test checkpoints."""
    raw = config if isinstance(config, Mapping) else config.raw
    model = LMModel(LMShape.from_config(raw))
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, p in model.state_dict().items():
        if key.endswith("alpha") or key.endswith("norm_cross.weight"):
            t = torch.ones(p.shape)
        elif key.endswith("norm_cross.bias"):
            t = torch.zeros(p.shape)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
            t = torch.randn(p.shape, generator=gen) / math.sqrt(fan_in)
        out[key] = t if key.startswith("condition_provider.") else t.to(torch.bfloat16)
    return out


def quantize_int8(model: LMModel) -> LMModel:
    """Switch every large projection to int8 weights (opt-in CPU speed mode; not bit-exact).

    Embeddings, norms and the speaker-memory key/value projection stay in the model dtype. The dense
    copies of quantized weights are released.
    """
    empty = torch.empty(0)

    def release(p: nn.Parameter) -> None:
        p.data = empty

    for name, module in model.named_modules():
        if name.startswith("condition_provider"):
            continue  # float32 conditioners, used once per session
        if isinstance(module, SelfAttention):
            ins = [Int8Weight(module.w_in(j)) for j in range(module.mult)]  # type: ignore[arg-type]
            outs = [Int8Weight(module.w_out(j)) for j in range(module.mult)]  # type: ignore[arg-type]
            module.int8 = (ins, outs)
            release(module.in_proj_weight)
            release(module.out_proj.weight)
        elif isinstance(module, CrossAttention):
            module.int8 = (Int8Weight(module.w_q()), Int8Weight(module.w_out()))  # type: ignore[arg-type]
            release(module.out_proj.weight)
        elif isinstance(module, Linear) and module.weight.numel() >= 1 << 16:
            module.int8 = Int8Weight(module.weight)
            release(module.weight)
    return model
