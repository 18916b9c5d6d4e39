"""Token sampling: temperature, top-k, and the "exponential race" draw.

Each session owns a `torch.Generator`, so a session's random draws do not depend on which other
sessions share its batch: a batched run equals the solo run under the same seed.
"""

from __future__ import annotations

import torch


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
) -> int:
    """Pick one token from 1-D `logits`. Temperature 0 is greedy (argmax)."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k > 0:
        probs, indices = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1)
    else:
        indices = None
    # argmax(p / E) with E ~ Exp(1) draws from p without a host sync (same law as multinomial).
    noise = torch.empty_like(probs[None]).exponential_(1, generator=generator)[0]
    choice = int(torch.argmax(probs / noise))
    return int(indices[choice]) if indices is not None else choice
