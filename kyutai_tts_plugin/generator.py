"""The generator: the device side of an engine step, for the slots the scheduler selects.

Everything a step needs lives on the device, in one row per slot: the caches (backbone KV, Mimi
streaming state), the tokens of the previous step, the semantic tokens of the last steps, and every
per-session setting (temperatures, top-k, n_q, padding bonus, RNG seed, summed conditions), written
once when a session joins. A step makes at most two device->host transfers: the sampled text tokens
(the DSM state machine runs on the host, like the reference's text hook), then one packed tensor
with the audio tokens and the decoded PCM. Sampling uses a counter-based noise keyed by (seed,
step, stream, vocabulary entry), so a seeded session draws the same tokens alone and in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import dsm
from .lm import LMModel, LMState, Rows, backbone_step, depformer_step
from .mimi import MimiModel, MimiStreamingDecoder
from .sampling import exponential_noise, sample, sample_with_noise, stream_keys, to_seed

Cross = Sequence[tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]]


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


@dataclass
class _Pending:
    rows: Rows
    steps: torch.Tensor
    hidden: torch.Tensor
    keys: torch.Tensor


class Generator:
    """Device state of `max_sessions` slots and the two halves of a step (text, then audio)."""

    def __init__(
        self, model: LMModel, mimi: MimiModel, max_sessions: int, device: torch.device, delay_steps: int
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
        self.delays = torch.tensor(shape.delays, **i64)
        self.initial = torch.tensor([shape.text_card] + [shape.card] * shape.n_q, **i64)
        self.prev = self.initial.repeat(max_sessions, 1)  # the tokens written at each slot's last step
        # Semantic tokens of the last max_delay + 1 steps (cell = step % that): a frame is decoded
        # once its acoustic tokens exist, max_delay steps after its semantic token.
        self.history = torch.zeros(max_sessions, self.max_delay + 1, **i64)
        self.streams = torch.arange(1 + self.dep_q, **i64)  # 0: text; 1 + q: codebook q
        self._pending: _Pending | None = None

    def join(self, row: int, settings: SlotSettings, cond_sum: torch.Tensor) -> None:
        """A session takes slot `row`: reset its caches and write its settings."""
        self.temperature[row] = settings.temperature
        self.temperature_text[row] = settings.temperature_text
        self.top_k[row] = settings.top_k
        self.top_k_text[row] = settings.top_k_text
        self.n_q[row] = settings.n_q
        self.padding_bonus[row] = settings.padding_bonus
        self.seed[row] = to_seed(settings.seed)
        self.cond_sum[row] = cond_sum
        self.lm_state.reset(row)
        self.decoder.reset([row])

    @torch.no_grad()
    def text_step(self, rows: Rows, steps: Sequence[int], cross: Cross, max_top_k_text: int) -> list[int]:
        """Backbone step of `rows` at their `steps`; returns the sampled text tokens (host sync 1)."""
        steps_t = torch.tensor(list(steps), dtype=torch.long, device=self.device)
        tokens = torch.where(steps_t[:, None] <= self.delays[None], self.initial[None], rows.take(self.prev))
        hidden, logits = backbone_step(
            self.model, self.lm_state, rows, tokens, steps_t, cross=cross, cond_sum=rows.take(self.cond_sum)
        )
        logits = logits.clone()
        logits[:, dsm.PAD] = (logits[:, dsm.PAD].float() + rows.take(self.padding_bonus)).to(logits.dtype)
        keys = stream_keys(rows.take(self.seed), steps_t, self.streams)
        sampled = sample(
            logits, rows.take(self.temperature_text), rows.take(self.top_k_text), keys[:, 0], max_top_k_text
        )
        self._pending = _Pending(rows, steps_t, hidden, keys)
        return sampled.tolist()

    @torch.no_grad()
    def audio_step(
        self,
        fed: Sequence[int],
        deep: Sequence[int],
        n_q: int,
        max_top_k: int,
        decode: Sequence[int],
        decode_slots: Sequence[int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Finish the step: depformer for the rows `deep` (indices into the step's rows) up to `n_q`
        codebooks, Mimi decoding for the rows `decode` (slots `decode_slots`), in one call each.

        Returns (audio tokens [n, dep_q] int, -1 where none; pcm [len(decode), frame] float32), brought
        to the host in one transfer (host sync 2; none when no row is deep).
        """
        pending = self._pending
        assert pending is not None, "text_step must come first"
        self._pending = None
        rows, steps, hidden, keys = pending.rows, pending.steps, pending.hidden, pending.keys
        n = len(rows)
        dev = self.device
        fed_t = torch.tensor(list(fed), dtype=torch.long, device=dev)
        audio = torch.full((n, self.dep_q), -1, dtype=torch.long, device=dev)
        pcm = torch.zeros(0, self.mimi.frame_size, dtype=torch.float32, device=dev)
        if deep:
            every = len(deep) == n
            idx = None if every else torch.tensor(list(deep), dtype=torch.long, device=dev)

            def pick(t: torch.Tensor) -> torch.Tensor:
                return t if idx is None else t[idx]

            temp, top_k = pick(rows.take(self.temperature)), pick(rows.take(self.top_k))
            row_nq, row_keys, row_steps = pick(rows.take(self.n_q)), pick(keys), pick(steps)

            # The noise of every codebook and vocabulary entry at once (a few ops, not a few per
            # codebook); each codebook reads it at its top-k entries.
            vocab = torch.arange(self.audio_vocab, dtype=torch.long, device=dev)
            noise = exponential_noise(row_keys[:, 1 : 1 + n_q], vocab.expand(1, 1, -1))

            def choose(q: int, logits: torch.Tensor) -> torch.Tensor:
                tok = sample_with_noise(
                    logits, temp, top_k, lambda entries: noise[:, q].gather(-1, entries), max_top_k
                )
                return torch.where(row_nq > q, tok, torch.full_like(tok, -1))  # past the row's n_q: none

            codes = depformer_step(self.model, pick(hidden), pick(fed_t), n_q, choose)
            # The acoustic codebooks are delayed: their first steps are not audio yet.
            keep = row_steps[:, None] >= self.delays[1 : 1 + n_q][None] + self.delay_steps
            codes = torch.where(keep, codes, torch.full_like(codes, -1))
            if idx is None:
                audio[:, :n_q] = codes
            else:
                audio[idx, :n_q] = codes
        self.prev[rows.index] = torch.cat([fed_t[:, None], audio], dim=1)
        cells = self.history.shape[1]
        self.history[rows.index, steps % cells] = audio[:, 0]
        if decode:
            di = torch.tensor(list(decode), dtype=torch.long, device=dev)
            semantic = self.history[rows.index[di], (steps[di] - self.max_delay) % cells]
            # Codebooks past a row's n_q are -1: Mimi leaves them out (they add exactly zero).
            codes = torch.cat([semantic[:, None], audio[di, 1 : max(n_q, 1)]], dim=1)[:, :, None]
            pcm = self.decoder.decode_step(codes, list(decode_slots)).clamp(-1, 1).float()
        if not deep:
            return np.full((n, self.dep_q), -1, dtype=np.int32), np.zeros(
                (0, self.mimi.frame_size), np.float32
            )
        packed = torch.cat([audio.to(torch.int32).view(torch.float32).flatten(), pcm.flatten()])
        host = packed.cpu().numpy()
        split = n * self.dep_q
        return host[:split].view(np.int32).reshape(n, self.dep_q), host[split:].reshape(
            len(decode), self.mimi.frame_size
        )
