"""Token sampling on the device, for all rows and codebooks at once.

The law is the reference's: probabilities ``softmax(logits / temperature)`` in float32, restricted to
the top-k, and one draw by the "exponential race" ``argmax(p / E)`` with ``E ~ Exp(1)``. Temperature 0
is greedy (argmax of the logits). Temperature and top-k are per-row tensors, so greedy and sampled
rows mix in one batch.

The noise does not come from a `torch.Generator`: it is a counter-based stream, a splitmix64 hash of
(seed, step, stream, vocabulary entry) computed with int64 tensor ops. A row's draws therefore depend
only on its own seed and step, never on the batch it runs in, and they are drawn per vocabulary
entry (the noise of a token is a function of its vocabulary id, never of its top-k rank), so a
near-tie that swaps two ranks does not change which noise value each token gets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def to_seed(seed: int) -> int:
    """Any Python int as an int64 seed (two's complement of its low 64 bits)."""
    return _signed(seed)


def _srl(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's `>>` is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors (multiplications wrap modulo 2**64)."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def mix64_reference(z: int) -> int:
    """The same finalizer on a Python int, unsigned: the tests' ground truth."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_keys(seed: torch.Tensor, step: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """Keys [n, S] of rows with int64 `seed` [n] at `step` [n] for the stream ids `streams` [S]."""
    k = mix64(seed * _GOLDEN + 1)
    k = mix64(k ^ (step * _GOLDEN))
    return mix64(k[:, None] ^ (streams[None, :] * _GOLDEN + 0x5851F42D4C957F2D))


def exponential_noise(keys: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """E ~ Exp(1), float32, for vocabulary `entries` [*keys.shape, K] of the streams `keys`."""
    z = mix64(keys[..., None] + (entries + 1) * _GOLDEN)
    u = (_srl(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # 24 random bits, in (0, 1)
    return -torch.log(u)


NoiseAt = Callable[[torch.Tensor], torch.Tensor]


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, keys: torch.Tensor, max_top_k: int
) -> torch.Tensor:
    """Pick one token per row of `logits` [n, ..., V] with the counter-based noise of `keys` [n, ...].

    temperature [n] float (0 = greedy), top_k [n] long (0 = whole vocabulary); `max_top_k` bounds
    every row's effective top-k (V if any row has top_k 0), so all shapes are static.
    Returns [n, ...] long.
    """
    return sample_with_noise(
        logits, temperature, top_k, lambda entries: exponential_noise(keys, entries), max_top_k
    )


def sample_with_noise(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, noise_at: NoiseAt, max_top_k: int
) -> torch.Tensor:
    """`sample` with the Exp(1) draws given by `noise_at(entries)` (entries [n, ..., K] vocabulary ids).

    The noise is a function of the vocabulary entry, never of its rank, and only the top-k entries
    need it: the top-k is applied as a mask over the sorted candidates (ranks past a row's k get
    probability 0), then the race ``argmax(p / E)`` picks among them.
    """
    vocab = logits.shape[-1]
    lead = logits.dim() - 1  # the dims before the vocabulary
    temp = temperature.view(-1, *(1,) * (lead - 1))
    greedy = torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / torch.where(temp > 0, temp, torch.ones_like(temp))[..., None], -1)
    k_max = max(1, min(max_top_k, vocab))
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=k_max)
    if k_max == vocab:
        # Every row sorts the whole vocabulary (the engine's case): a row's candidates then never
        # depend on the other rows of its batch, ties included.
        values, entries = torch.sort(probs, dim=-1, descending=True, stable=True)
    else:
        values, entries = torch.topk(probs, k_max, dim=-1)
    rank = torch.arange(k_max, device=logits.device)
    kept = torch.where(rank < k.view(-1, *(1,) * (lead - 1), 1), values, torch.zeros_like(values))
    choice = torch.argmax(kept / noise_at(entries), dim=-1, keepdim=True)
    drawn = entries.gather(-1, choice)[..., 0]
    return torch.where(temp > 0, drawn, greedy)
