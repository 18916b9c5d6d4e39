"""Classifier-free guidance for a model trained without CFG distillation (no `cfg` conditioner).

The reference (moshi's `LMGen` with ``cfg_coef != 1``) doubles the batch: each item gets a null branch
whose inputs carry no voice prefix and no text. Here the null branch is another slot of the same batch
(see `generator.Generator.join`); this combines each session's audio logits with its null branch's
before sampling, with the reference's arithmetic so that float32 runs match it bit for bit.
"""

from __future__ import annotations

import torch


def combine_cfg(logits: torch.Tensor, null_of: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``null + (cond - null) * coef`` per row, where row i's null branch is row ``null_of[i]``.

    logits [n, V]; null_of [n] (a row without a null branch names itself: it is left unchanged,
    exactly); coef [n] float32. Null-branch rows get a value too; the caller ignores what they sample.
    """
    null = logits[null_of]
    guided = null + (logits - null) * coef.to(logits.dtype)[:, None]
    rows = torch.arange(logits.shape[0], device=logits.device)
    return torch.where((null_of != rows)[:, None], guided, logits)
