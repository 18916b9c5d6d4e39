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
    return -torch.log(open_unit_interval(mix64(keys[..., None] + (entries + 1) * _GOLDEN)))


def open_unit_interval(z: torch.Tensor) -> torch.Tensor:
    """Uniform float32 in (0, 1) from the top 23 bits of int64 `z`: (x + 0.5) / 2**23 lies in
    [2**-24, 1 - 2**-24], both exact in float32, so -log(u) > 0. (With 24 bits the top value rounds
    to 1.0, E to 0, and a candidate outside the top-k gets 0 / 0 = NaN, which argmax takes for the
    maximum: once in ~16 million draws per entry, a token outside the top-k.)"""
    return (_srl(z, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


NoiseAt = Callable[[torch.Tensor], torch.Tensor]


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, keys: torch.Tensor, max_top_k: int
) -> torch.Tensor:
    """Pick one token per row of `logits` [n, ..., V] with the counter-based noise of `keys` [n, ...].

    temperature [n] float (0 = greedy), top_k [n] long (0 = whole vocabulary); `max_top_k` bounds
    the effective top-k of every sampled row (V if one has top_k 0), so all shapes are static. Any
    bound at least that large gives the same tokens. Returns [n, ...] long.
    """
    return sample_with_noise(
        logits, temperature, top_k, lambda entries: exponential_noise(keys, entries), max_top_k
    )


def rank_order(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `k` (values, entries) of `probs` [..., V] (>= 0) in a total order: value descending,
    then vocabulary id ascending (what a stable descending sort gives).

    A plain top-k breaks ties at its boundary as it likes, so a row's candidates would depend on the
    k asked for, hence on the batch. Packing (float bits, reversed id) into one int64 makes every key
    distinct: the first k ranks are then the same whatever k is, at the cost of a top-k, not a sort.
    """
    vocab = probs.shape[-1]
    # Non-negative float32 values order like their bit patterns read as integers.
    bits = probs.contiguous().view(torch.int32).long()
    reversed_id = torch.arange(vocab - 1, -1, -1, device=probs.device)
    top = torch.topk((bits << 32) | reversed_id, k, dim=-1).values
    entries = (vocab - 1) - (top & 0xFFFFFFFF)
    return probs.gather(-1, entries), entries


def sample_with_noise(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, noise_at: NoiseAt, max_top_k: int
) -> torch.Tensor:
    """`sample` with the Exp(1) draws given by `noise_at(entries)` (entries [n, ..., K] vocabulary ids).

    The noise is a function of the vocabulary entry, never of its rank, and only the candidates need
    it: the top-k is a mask over the ranked candidates (ranks past a row's k get probability 0), then
    the race ``argmax(p / E)`` picks among them.
    """
    vocab = logits.shape[-1]
    lead = logits.dim() - 1  # the dims before the vocabulary
    temp = temperature.view(-1, *(1,) * (lead - 1))
    greedy = torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / torch.where(temp > 0, temp, torch.ones_like(temp))[..., None], -1)
    k_max = max(1, min(max_top_k, vocab))
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=k_max)
    values, entries = rank_order(probs, k_max)
    rank = torch.arange(k_max, device=logits.device)
    kept = torch.where(rank < k.view(-1, *(1,) * (lead - 1), 1), values, torch.zeros_like(values))
    choice = torch.argmax(kept / noise_at(entries), dim=-1, keepdim=True)
    drawn = entries.gather(-1, choice)[..., 0]
    return torch.where(temp > 0, drawn, greedy)
