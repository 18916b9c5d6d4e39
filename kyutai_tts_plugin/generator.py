"""The generator: the device side of an engine step, on fixed slots with static shapes.

Everything a step needs lives on the device, in one row per slot: the caches (backbone KV, each
slot's voice keys/values, Mimi streaming state), each slot's step counter, the tokens of its previous
step, the semantic tokens of its last steps, and every per-session setting (temperatures, top-k, n_q,
padding bonus, RNG seed, summed conditions), written once when a session joins.

A step runs the first `span` slots, `span` taken from a few batch buckets (powers of two and
`max_sessions`), whoever of them is really stepping: a row that waits (for words, for its reader) or
is empty is computed and masked, never removed, as the reference's `exec_mask` does. Slots are handed
out lowest first, so the span follows the number of sessions. The two halves of a step, backbone
(+ text sampling) and depformer (+ audio sampling, the slots' bookkeeping and Mimi), are pure tensor
programs of static shape for a given (span, n_q, candidate bound): `compile=True` compiles each with
`torch.compile(fullgraph=True)`, with CUDA graphs on a CUDA device. Mimi decodes every slot of the
span, and only the slots due a frame move their decoder state on (masked writes).

A step makes at most two device->host transfers: the sampled text tokens (the DSM state machine runs
on the host, like the reference's text hook), then one packed tensor with the audio tokens and the
decoded PCM. Sampling uses a counter-based noise keyed by (seed, step, stream, vocabulary entry), and
a top-k whose ties break by vocabulary id, so a seeded session draws the same tokens alone and in any
batch; the noise is drawn only for the ranked candidates (the span's largest top-k).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import dsm
from .lm import LMModel, LMState, backbone_step, depformer_step
from .mimi import MimiModel, MimiStreamingDecoder
from .sampling import sample, stream_keys, to_seed

# Compiled variants per half: batch buckets x n_q values in use.
COMPILE_VARIANTS = 64


def batch_buckets(max_sessions: int) -> list[int]:
    """The spans a step may run: powers of two below `max_sessions`, then `max_sessions`."""
    out = [1]
    while out[-1] * 2 < max_sessions:
        out.append(out[-1] * 2)
    return sorted({*out, max_sessions})


@dataclass(frozen=True)
class SlotSettings:
    """The per-session settings a slot holds on the device."""

    temperature: float
    top_k: int
    temperature_text: float
    top_k_text: int
    n_q: int
    padding_bonus: float
    seed: int


def candidate_bound(settings: Iterable[SlotSettings | None], text: bool, vocab: int) -> int:
    """How many ranked candidates a step samples from: the largest top-k of the sampling rows,
    rounded up to a power of two so that few shapes are compiled (any bound at least that large
    draws the same tokens); 1 when every row is greedy."""
    bound = 1
    for s in settings:
        if s is None or (s.temperature_text if text else s.temperature) <= 0:
            continue
        k = s.top_k_text if text else s.top_k
        bound = max(bound, vocab if k <= 0 else k)
    return min(vocab, 1 << (bound - 1).bit_length())


@dataclass
class _Pending:
    span: int
    hidden: torch.Tensor
    keys: torch.Tensor


class Generator:
    """Device state of `max_sessions` slots and the two halves of a step (text, then audio)."""

    def __init__(
        self,
        model: LMModel,
        mimi: MimiModel,
        max_sessions: int,
        device: torch.device,
        delay_steps: int,
        compile: bool = False,
    ) -> None:
        shape = model.shape
        self.model = model
        self.mimi = mimi
        self.device = device
        self.delay_steps = delay_steps
        self.dep_q = shape.dep_q
        self.text_vocab = shape.text_card
        self.audio_vocab = shape.card
        self.max_delay = max(shape.delays)
        self.buckets = batch_buckets(max_sessions)
        model.rope.freqs = model.rope.freqs.to(device)  # a constant of the step, not a per-step copy
        self.lm_state = LMState(model, max_sessions)
        self.decoder = MimiStreamingDecoder(mimi, max_sessions)
        f32 = {"dtype": torch.float32, "device": device}
        i64 = {"dtype": torch.long, "device": device}
        self.temperature = torch.zeros(max_sessions, **f32)
        self.temperature_text = torch.zeros(max_sessions, **f32)
        self.top_k = torch.zeros(max_sessions, **i64)
        self.top_k_text = torch.zeros(max_sessions, **i64)
        self.n_q = torch.zeros(max_sessions, **i64)
        self.padding_bonus = torch.zeros(max_sessions, **f32)
        self.seed = torch.zeros(max_sessions, **i64)
        self.cond_sum = torch.zeros(max_sessions, shape.dim, **f32)
        self.step = torch.zeros(max_sessions, **i64)  # each slot's own step index
        self.delays = torch.tensor(shape.delays, **i64)
        self.initial = torch.tensor([shape.text_card] + [shape.card] * shape.n_q, **i64)
        self.prev = self.initial.repeat(max_sessions, 1)  # the tokens written at each slot's last step
        # Semantic tokens of the last max_delay + 1 steps (cell = step % that): a frame is decoded
        # once its acoustic tokens exist, max_delay steps after its semantic token.
        self.history = torch.zeros(max_sessions, self.max_delay + 1, **i64)
        self.streams = torch.arange(1 + self.dep_q, **i64)  # 0: text; 1 + q: codebook q
        self.settings: list[SlotSettings | None] = [None] * max_sessions  # host copies, for static shapes
        self._pending: _Pending | None = None
        self._text: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = self._text_tensors
        self._audio: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._audio_tensors
        if compile:
            self._compile()

    def _compile(self) -> None:
        dynamo: Any = torch._dynamo
        for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), COMPILE_VARIANTS))
        options: dict[str, Any] = {"fullgraph": True, "dynamic": False}
        if self.device.type == "cuda":
            # CUDA graphs replay into the state tensors in place: their addresses must not change.
            for t in self._state_tensors():
                dynamo.mark_static_address(t)
            options["mode"] = "reduce-overhead"
        self._text = torch.compile(self._text_tensors, **options)
        self._audio = torch.compile(self._audio_tensors, **options)

    def _state_tensors(self) -> list[torch.Tensor]:
        st = self.lm_state
        return [
            st.k,
            st.v,
            st.cell_pos,
            *(t for t in (st.cross_k, st.cross_v) if t is not None),
            self.step,
            self.prev,
            self.history,
            *self.decoder.state.buffers.values(),
        ]

    def join(
        self,
        row: int,
        settings: SlotSettings,
        cond_sum: torch.Tensor,
        cross: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """A session takes slot `row`: reset its caches, write its settings and its voice's
        cross-attention keys/values (`cross`, per layer, for a model with speaker cross-attention)."""
        fresh_cross = cross is not None and self.lm_state.cross_k is None
        self.lm_state.reset(row, cross)
        if fresh_cross and self.device.type == "cuda" and self._text is not self._text_tensors:
            assert self.lm_state.cross_k is not None and self.lm_state.cross_v is not None
            torch._dynamo.mark_static_address(self.lm_state.cross_k)
            torch._dynamo.mark_static_address(self.lm_state.cross_v)
        self.settings[row] = settings
        self.temperature[row] = settings.temperature
        self.temperature_text[row] = settings.temperature_text
        self.top_k[row] = settings.top_k
        self.top_k_text[row] = settings.top_k_text
        self.n_q[row] = settings.n_q
        self.padding_bonus[row] = settings.padding_bonus
        self.seed[row] = to_seed(settings.seed)
        self.cond_sum[row] = cond_sum
        self.step[row] = 0
        self.prev[row] = self.initial
        self.decoder.reset([row])

    def span_for(self, rows: Iterable[int]) -> int:
        """The smallest batch bucket holding every slot in `rows`."""
        last = max(rows)
        return next(b for b in self.buckets if b > last)

    @torch.no_grad()
    def text_step(self, span: int) -> list[int]:
        """Backbone step of slots 0..span-1; returns their sampled text tokens (host sync 1).

        Only the slots the caller then feeds in `audio_step` advance: for the others this step is
        computed and forgotten.
        """
        k_text = candidate_bound(self.settings[:span], True, self.text_vocab)
        hidden, keys, sampled = self._text(span, k_text)
        self._pending = _Pending(span, hidden, keys)
        return sampled.tolist()

    @torch.no_grad()
    def audio_step(self, fed: Sequence[int], n_q: int, decode: bool) -> tuple[np.ndarray, np.ndarray]:
        """Finish the step. `fed`: per slot of the span, the text token the state machine fed, or -1
        for a slot that does not advance. Runs the depformer on the span up to `n_q` codebooks (none
        when 0), then, with `decode`, Mimi on the span: the slots due a frame (stepping, their first
        frame complete) advance their decoder.

        Returns (audio tokens [span, dep_q] int, -1 where none; pcm [span, frame] float32, meaningful
        for the slots due a frame, empty without `decode`), brought to the host in one transfer (host
        sync 2; none when `n_q` is 0).
        """
        pending = self._pending
        assert pending is not None, "text_step must come first"
        self._pending = None
        span = pending.span
        if len(fed) != span:
            raise ValueError(f"fed has {len(fed)} slots, the step spans {span}")
        decode = decode and n_q > 0
        fed_t = torch.tensor(list(fed), dtype=torch.long).to(self.device, non_blocking=True)
        k_audio = candidate_bound(self.settings[:span], False, self.audio_vocab)
        audio, pcm = self._audio(span, n_q, k_audio, decode, pending.hidden, pending.keys, fed_t)
        if n_q == 0:
            return np.full((span, self.dep_q), -1, dtype=np.int32), np.zeros(
                (0, self.mimi.frame_size), np.float32
            )
        packed = torch.cat([audio.to(torch.int32).view(torch.float32).flatten(), pcm.flatten()])
        host = packed.cpu().numpy()
        split = span * self.dep_q
        return host[:split].view(np.int32).reshape(span, self.dep_q), host[split:].reshape(
            -1, self.mimi.frame_size
        )

    # -- the two halves as pure tensor programs (compiled with compile=True) --------------------

    def _text_tensors(self, span: int, k_text: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = self.step[:span]
        prev = self.prev[:span]
        tokens = torch.where(step[:, None] <= self.delays[None], self.initial[None], prev)
        hidden, logits = backbone_step(self.model, self.lm_state, tokens, step, self.cond_sum[:span])
        bonus = torch.zeros_like(logits, dtype=torch.float32)
        bonus[:, dsm.PAD] = self.padding_bonus[:span]
        logits = (logits.float() + bonus).to(logits.dtype)
        keys = stream_keys(self.seed[:span], step, self.streams)
        sampled = sample(logits, self.temperature_text[:span], self.top_k_text[:span], keys[:, 0], k_text)
        return hidden, keys, sampled

    def _audio_tensors(
        self,
        span: int,
        n_q: int,
        k_audio: int,
        decode: bool,
        hidden: torch.Tensor,
        keys: torch.Tensor,
        fed: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        active = fed >= 0
        step = self.step[:span]
        audio = torch.full((span, self.dep_q), -1, dtype=torch.long, device=fed.device)
        if n_q > 0:
            temp, top_k, row_nq = self.temperature[:span], self.top_k[:span], self.n_q[:span]

            def choose(q: int, logits: torch.Tensor) -> torch.Tensor:
                tok = sample(logits, temp, top_k, keys[:, 1 + q], k_audio)
                return torch.where(row_nq > q, tok, torch.full_like(tok, -1))  # past the row's n_q: none

            codes = depformer_step(self.model, hidden, fed.clamp(min=0), n_q, choose)
            # The acoustic codebooks are delayed: their first steps are not audio yet.
            keep = step[:, None] >= self.delays[1 : 1 + n_q][None] + self.delay_steps
            codes = torch.where(keep, codes, torch.full_like(codes, -1))
            audio = torch.cat([codes, audio[:, n_q:]], dim=1)
        written = torch.cat([fed[:, None], audio], dim=1)
        self.prev[:span] = torch.where(active[:, None], written, self.prev[:span])
        rows = torch.arange(span, device=fed.device)
        cells = self.history.shape[1]
        cell = step % cells
        self.history[rows, cell] = torch.where(active, audio[:, 0], self.history[rows, cell])
        semantic = self.history[rows, (step - self.max_delay) % cells]
        # Frame step - max_delay is complete now: its semantic token is from then, its acoustic ones
        # from now. (Computed before the step counters move: `step` is a view of them.)
        due = active & (step >= self.max_delay + self.delay_steps)
        self.step[:span] = step + active.long()
        pcm = torch.zeros(span if decode else 0, self.mimi.frame_size, device=fed.device)
        if decode:
            # Codebooks past a row's n_q are -1: Mimi leaves them out.
            codes = torch.cat([semantic[:, None], audio[:, 1 : max(n_q, 1)]], dim=1)[:, :, None]
            pcm = self.decoder.decode_span(codes, due).clamp(-1, 1).float()
        return audio, pcm
