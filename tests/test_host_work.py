"""Host work per engine step does not grow with the batch: at most 2 host syncs, the same aten ops.

Counts, not time (machine-independent): see benchmarks/bench_host_work.py for the full table.
"""

from __future__ import annotations

import torch

from kyutai_tts_plugin.engine import TTSEngine
from kyutai_tts_plugin.profiling import count_engine_steps
from kyutai_tts_plugin.types import SessionOptions

TEXT = "one two three four five six seven"


def _per_step(root, batch: int) -> tuple[float, float]:
    engine = TTSEngine.from_pretrained(
        root, voice_repo=root / "voices", max_sessions=batch, interleave_text_only=0
    )
    try:
        records, remove = count_engine_steps(engine, audio_only=True)
        sessions = []
        for i in range(batch):
            # Row 0 (the batch-1 run) has the largest settings; the others mix greedy and sampled
            # rows, smaller n_q and top-k: none of it may add per-row host work.
            opts = SessionOptions(
                n_q=8 if i % 2 == 0 else 4,
                temperature=0.0 if i % 3 == 2 else 0.6,
                top_k=250 if i % 4 else 100,
                seed=i,
            )
            s = engine.open_session(opts)
            s.push_text(TEXT)
            s.flush()
            sessions.append(s)
        for s in sessions:
            for _ in s:
                pass
        remove()
    finally:
        engine.close()
    full = [(ops, syncs) for n, ops, syncs in records if n == batch]
    assert full, "no step ran every session"
    return max(o for o, _ in full), max(s for _, s in full)


def test_syncs_and_ops_per_step_do_not_grow_with_the_batch(tiny_checkpoint):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ops1, syncs1 = _per_step(tiny_checkpoint, 1)
        ops16, syncs16 = _per_step(tiny_checkpoint, 16)
    finally:
        torch.set_num_threads(threads)
    assert syncs1 <= 2 and syncs16 <= 2, (syncs1, syncs16)
    assert ops16 <= 1.15 * ops1, (ops1, ops16)
