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

A model that takes its voice as an audio prefix (no speaker cross-attention) gets two more things, as
the reference's TTS loop does them: each slot's prefix codes are forced over the sampled audio tokens at
the steps they belong to (a per-slot queue on the device), and real classifier-free guidance runs the
null branch as a second slot of the session, stepped in the same batch: it reads its session's tokens
with the prefix (and the text, always) zeroed, and the session's audio logits are combined with it
before sampling.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import dsm
from .cfg import combine_cfg
from .lm import LMModel, LMState, backbone_step, depformer_step
from .mimi import MimiModel, MimiStreamingDecoder
from .sampling import sample, stream_keys, to_seed

# Compiled variants per half (dynamo's recompile limit): batch buckets x n_q values x candidate
# bounds (x decode or not, x attended cache cells) in use.
COMPILE_VARIANTS = 1024
FEWEST_CELLS = 64  # the smallest attended part of the backbone's KV cache
UNFORCED = -2  # a prefix cell with nothing to force (the reference's "ungenerated" token)


def batch_buckets(max_sessions: int) -> list[int]:
    """The spans a step may run: powers of two below `max_sessions`, then `max_sessions`."""
    out = [1]
    while out[-1] * 2 < max_sessions:
        out.append(out[-1] * 2)
    return sorted({*out, max_sessions})


def attended_cells(longest: int, context: int) -> int:
    """KV cache cells a backbone step reads when the span's slots hold at most `longest` positions:
    a power of two from FEWEST_CELLS, the whole ring once a slot reaches it. Cell p holds position p
    until the ring wraps, so the cells past `longest` are empty: reading them would only cost
    bandwidth (at batch 64 on a GPU the full cache is most of a step's memory traffic), and a reply
    of a few seconds fills a fraction of the 40 s window."""
    cells = FEWEST_CELLS
    while cells < longest:
        cells *= 2
    return min(cells, context)


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
        max_prefix_frames: int = 0,
    ) -> None:
        """`max_prefix_frames` > 0: slots may hold an audio prefix of up to that many frames (and a
        CFG null branch in a second slot); 0: neither (a model with speaker cross-attention)."""
        shape = model.shape
        self.model = model
        self.mimi = mimi
        self.device = device
        self.delay_steps = delay_steps
        self.dep_q = shape.dep_q
        self.text_vocab = shape.text_card_out
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
        self.host_step = np.zeros(max_sessions, np.int64)  # the same, kept by the host (no sync)
        self.delays = torch.tensor(shape.delays, **i64)
        self.initial = torch.tensor([shape.text_card] + [shape.card] * shape.n_q, **i64)
        self.prev = self.initial.repeat(max_sessions, 1)  # the tokens written at each slot's last step
        # Semantic tokens of the last max_delay + 1 steps (cell = step % that): a frame is decoded
        # once its acoustic tokens exist, max_delay steps after its semantic token.
        self.history = torch.zeros(max_sessions, self.max_delay + 1, **i64)
        self.streams = torch.arange(1 + self.dep_q, **i64)  # 0: text; 1 + q: codebook q
        self.settings: list[SlotSettings | None] = [None] * max_sessions  # host copies, for static shapes
        # Audio prefixes and CFG null branches (see the module docstring); None for other models.
        self.prefixes = max_prefix_frames > 0
        self.forced: torch.Tensor | None = None
        if self.prefixes:
            # Column j: the prefix codes forced at a slot's step j (-2: not forced). The last column
            # is never written: steps past the prefix read it.
            cols = max_prefix_frames + self.max_delay + delay_steps + 1
            self.forced = torch.full((max_sessions, cols, self.dep_q), UNFORCED, **i64)
        rows = torch.arange(max_sessions, **i64)
        self.source = rows.clone()  # the slot whose tokens a slot reads: its session's for a null branch
        self.null_of = rows.clone()  # a session slot's null-branch slot (itself without CFG)
        self.is_null = torch.zeros(max_sessions, dtype=torch.bool, device=device)
        self.cfg_coef = torch.ones(max_sessions, **f32)
        self.mask_until = torch.zeros(max_sessions, **i64)  # a null branch's inputs are zero until this
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
            *st.k,
            *st.v,
            st.cell_pos,
            *(t for t in (st.cross_k, st.cross_v) if t is not None),
            self.step,
            self.prev,
            self.history,
            *self.decoder.state.buffers.values(),
            *(t for t in (self.forced,) if t is not None),
        ]

    def join(
        self,
        row: int,
        settings: SlotSettings,
        cond_sum: torch.Tensor,
        cross: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        prefix: torch.Tensor | None = None,
        null_row: int | None = None,
        cfg_coef: float = 1.0,
    ) -> None:
        """A session takes slot `row`: reset its caches, write its settings and its voice's
        cross-attention keys/values (`cross`, per layer, for a model with speaker cross-attention).

        `prefix` (codes [dep_q, T]): audio forced at the first steps, each codebook at its own delay
        after the text-to-audio delay. `null_row`: the slot of the session's CFG null branch, whose
        audio logits are combined as null + cfg_coef * (cond - null).
        """
        self._join_row(row, settings, cond_sum, cross)
        self.source[row] = row
        self.null_of[row] = row if null_row is None else null_row
        self.is_null[row] = False
        self.cfg_coef[row] = cfg_coef
        self.mask_until[row] = 0
        frames = 0 if prefix is None else prefix.shape[-1]
        if self.forced is not None:
            self.forced[row] = UNFORCED
            if prefix is not None:
                self._write_prefix(row, prefix)
        elif prefix is not None:
            raise ValueError("this generator was built without audio prefixes (max_prefix_frames=0)")
        if null_row is not None:
            self._join_row(null_row, settings, cond_sum, cross)
            self.source[null_row] = row
            self.null_of[null_row] = null_row
            self.is_null[null_row] = True
            self.cfg_coef[null_row] = 1.0
            # The reference zeroes the null branch's inputs while step <= delay_k + this (its
            # `cfg_is_masked_until`: the prefix length plus the text-to-audio delay).
            self.mask_until[null_row] = frames + self.delay_steps
            if self.forced is not None:
                self.forced[null_row] = UNFORCED

    def _write_prefix(self, row: int, prefix: torch.Tensor) -> None:
        assert self.forced is not None
        n_q, frames = prefix.shape
        if n_q != self.dep_q:
            raise ValueError(f"the prefix has {n_q} codebooks, the model {self.dep_q}")
        if frames + self.max_delay + self.delay_steps >= self.forced.shape[1]:
            raise ValueError(f"the prefix has {frames} frames, more than this generator holds")
        codes = prefix.to(self.device, torch.long)
        for q in range(n_q):
            start = int(self.delays[1 + q]) + self.delay_steps
            self.forced[row, start : start + frames, q] = codes[q]

    def _join_row(
        self,
        row: int,
        settings: SlotSettings,
        cond_sum: torch.Tensor,
        cross: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> None:
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
        self.host_step[row] = 0
        self.prev[row] = self.initial
        self.decoder.reset([row])

    def save_rows(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """Copies of the device state of slots that have run `step` steps from a fresh start (fewer
        than the attention window): their KV cells, last tokens, semantic history and Mimi decoder
        state. `load_rows` puts them into other slots, which then continue from that step."""
        st = self.lm_state
        saved = []
        for r in rows:
            n = int(self.host_step[r])
            assert n <= st.cell_pos.shape[1], "only a state that still fits the attention window"
            saved.append(
                {
                    "step": n,
                    "k": torch.stack([k[r, :, :n] for k in st.k]),
                    "v": torch.stack([v[r, :, :n] for v in st.v]),
                    "prev": self.prev[r].clone(),
                    "history": self.history[r].clone(),
                    "decoder": {key: buf[r].clone() for key, buf in self.decoder.state.buffers.items()},
                }
            )
        return saved

    def load_rows(self, rows: Sequence[int], saved: Sequence[dict[str, Any]]) -> None:
        """Slots (just joined) take the state `save_rows` copied: they continue from its step."""
        st = self.lm_state
        for r, snap in zip(rows, saved, strict=True):
            n = snap["step"]
            for layer, (k, v) in enumerate(zip(st.k, st.v, strict=True)):
                k[r, :, :n] = snap["k"][layer]
                v[r, :, :n] = snap["v"][layer]
            st.cell_pos[r] = -1
            st.cell_pos[r, :n] = torch.arange(n, device=self.device)  # position p sits in cell p
            self.step[r] = n
            self.host_step[r] = n
            self.prev[r] = snap["prev"]
            self.history[r] = snap["history"]
            for key, value in snap["decoder"].items():
                self.decoder.state.buffers[key][r] = value

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
        cells = attended_cells(int(self.host_step[:span].max()) + 1, self.model.shape.context)
        hidden, keys, sampled = self._text(span, k_text, cells)
        self._pending = _Pending(span, hidden, keys)
        return sampled.tolist()

    @torch.no_grad()
    def audio_step(
        self,
        fed: Sequence[int],
        n_q: int,
        decode: bool,
        active: Sequence[bool] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Finish the step. `fed`: per slot of the span, the text token the state machine fed (-1, the
        zero token, while a prefix is forced). `active`: per slot, whether it advances (default: those
        fed a token >= 0); a null-branch slot advances with its session. Runs the depformer on the span
        up to `n_q` codebooks (none when 0), then, with `decode`, Mimi on the span: the session slots
        due a frame (advancing, their first frame complete) move their decoder on.

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
        if active is None:
            active = [f >= 0 for f in fed]
        if len(active) != span:
            raise ValueError(f"active has {len(active)} slots, the step spans {span}")
        decode = decode and n_q > 0
        fed_t = torch.tensor(list(fed), dtype=torch.long).to(self.device, non_blocking=True)
        active_t = torch.tensor(list(active), dtype=torch.bool).to(self.device, non_blocking=True)
        k_audio = candidate_bound(self.settings[:span], False, self.audio_vocab)
        audio, pcm = self._audio(span, n_q, k_audio, decode, pending.hidden, pending.keys, fed_t, active_t)
        self.host_step[:span] += np.asarray(active, dtype=bool)
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

    def _text_tensors(
        self, span: int, k_text: int, cells: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        step = self.step[:span]
        is_init = step[:, None] <= self.delays[None]
        if self.prefixes:
            # A null branch reads its session's tokens, zeroed except the initial ones: the text
            # always, the audio while step <= delay_k + mask_until (the reference's cfg_is_no_text and
            # cfg_is_no_prefix); mask_until is 0 and is_null False on every other slot.
            prev = self.prev[self.source[:span]]
            tokens = torch.where(is_init, self.initial[None], prev)
            null = self.is_null[:span, None]
            masked = step[:, None] <= self.delays[None] + self.mask_until[:span, None]
            masked[:, 0] = True
            tokens = torch.where(null & masked & ~is_init, torch.full_like(tokens, -1), tokens)
        else:
            tokens = torch.where(is_init, self.initial[None], self.prev[:span])
        hidden, logits = backbone_step(self.model, self.lm_state, tokens, step, self.cond_sum[:span], cells)
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
        active: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.step[:span]
        source = self.source[:span]
        if self.prefixes:
            fed = fed[source]  # a null branch's depformer reads its session's text token
        audio = torch.full((span, self.dep_q), -1, dtype=torch.long, device=fed.device)
        if n_q > 0:
            temp, top_k, row_nq = self.temperature[:span], self.top_k[:span], self.n_q[:span]

            def choose(q: int, logits: torch.Tensor) -> torch.Tensor:
                if self.prefixes:
                    logits = combine_cfg(logits, self.null_of[:span], self.cfg_coef[:span])
                tok = sample(logits, temp, top_k, keys[:, 1 + q], k_audio)
                if self.prefixes:
                    tok = tok[source]  # a null branch continues with its session's token
                return torch.where(row_nq > q, tok, torch.full_like(tok, -1))  # past the row's n_q: none

            codes = depformer_step(self.model, hidden, fed, n_q, choose)
            # The acoustic codebooks are delayed: their first steps are not audio yet.
            keep = step[:, None] >= self.delays[1 : 1 + n_q][None] + self.delay_steps
            codes = torch.where(keep, codes, torch.full_like(codes, -1))
            if self.forced is not None:
                # The prefix replaces what was sampled (after the whole chain, as the reference's hook).
                last = self.forced.shape[1] - 1
                col = self.forced[torch.arange(span, device=fed.device), step.clamp(max=last)][:, :n_q]
                forced = (col != UNFORCED) & (row_nq[:, None] > torch.arange(n_q, device=fed.device)[None])
                codes = torch.where(forced, col, codes)
            audio = torch.cat([codes, audio[:, n_q:]], dim=1)
        written = torch.cat([fed[:, None], audio], dim=1)
        self.prev[:span] = torch.where(active[:, None], written, self.prev[:span])
        rows = torch.arange(span, device=fed.device)
        cells = self.history.shape[1]
        cell = step % cells
        self.history[rows, cell] = torch.where(active, audio[:, 0], self.history[rows, cell])
        semantic = self.history[rows, (step - self.max_delay) % cells]
        # Frame step - max_delay is complete now: its semantic token is from then, its acoustic ones
        # from now. (Computed before the step counters move: `step` is a view of them.) A null
        # branch's audio is never heard: its decoder stays still.
        due = active & ~self.is_null[:span] & (step >= self.max_delay + self.delay_steps)
        self.step[:span] = step + active.long()
        pcm = torch.zeros(span if decode else 0, self.mimi.frame_size, device=fed.device)
        if decode:
            # Codebooks past a row's n_q are -1: Mimi leaves them out.
            codes = torch.cat([semantic[:, None], audio[:, 1 : max(n_q, 1)]], dim=1)[:, :, None]
            pcm = self.decoder.decode_span(codes, due).clamp(-1, 1).float()
        return audio, pcm
