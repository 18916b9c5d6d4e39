"""Host work per engine step: aten ops and device->host syncs, at batch 1, 16 and 64 (tiny checkpoint).

Counts, not time: the numbers do not depend on the machine. One thread. `--time` adds the median
milliseconds per step (ours: steps where every session generates audio; moshi: between its frames),
measured in the same run, so read the ratios.

    PYTHONPATH=$PWD python3 benchmarks/bench_host_work.py [--batch 1 16 64] [--n-q 16] [--temperature 0.6]
        [--moshi] [--time] [--compile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kyutai_tts_plugin.engine import TTSEngine  # noqa: E402
from kyutai_tts_plugin.profiling import HostWorkCounter, count_engine_steps  # noqa: E402
from kyutai_tts_plugin.testing import make_test_checkpoint  # noqa: E402
from kyutai_tts_plugin.types import SessionOptions  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog while seven stars shine above the quiet hills"


def _run_sessions(engine: TTSEngine, batch: int, n_q: int, temperature: float) -> None:
    sessions = []
    for i in range(batch):
        s = engine.open_session(SessionOptions(n_q=n_q, temperature=temperature, seed=i))
        s.push_text(TEXT)
        s.flush()
        sessions.append(s)
    for s in sessions:
        for _ in s:
            pass


def _engine(root: Path, batch: int, **engine_kwargs: object) -> TTSEngine:
    return TTSEngine.from_pretrained(
        root, voice_repo=root / "voices", max_sessions=batch, interleave_text_only=0, **engine_kwargs
    )


def measure_ours(
    root: Path, batch: int, n_q: int, temperature: float, **engine_kwargs: object
) -> tuple[float, float]:
    """Mean (ops, syncs) per step over the steps where all `batch` sessions generate audio."""
    engine = _engine(root, batch, **engine_kwargs)
    try:
        records, remove = count_engine_steps(engine, audio_only=True)
        _run_sessions(engine, batch, n_q, temperature)
        remove()
    finally:
        engine.close()
    full = [(ops, syncs) for n, ops, syncs in records if n == batch]
    if not full:
        raise RuntimeError("no step ran all sessions together")
    return sum(o for o, _ in full) / len(full), sum(s for _, s in full) / len(full)


def time_ours(root: Path, batch: int, n_q: int, temperature: float, **engine_kwargs: object) -> float:
    """Median ms of the steps where all `batch` sessions generate audio (after one warm-up run)."""
    engine = _engine(root, batch, **engine_kwargs)
    times: list[float] = []
    original = engine._step

    def step(sessions: list, *args: object) -> None:
        t0 = time.perf_counter()
        original(sessions, *args)
        if len(sessions) == batch and all(s.run is None or s.run.step > engine.delay_steps for s in sessions):
            times.append(time.perf_counter() - t0)

    try:
        _run_sessions(engine, batch, n_q, temperature)  # warm-up (and compilation with --compile)
        engine._step = step  # type: ignore[method-assign]
        _run_sessions(engine, batch, n_q, temperature)
    finally:
        engine.close()
    return statistics.median(times) * 1000


def _moshi(root: Path, n_q: int, temperature: float) -> tuple[Any, Any, Any] | None:
    """moshi's `TTSModel` on a copy of the checkpoint, with TEXT's entries and the conditions, or
    None without moshi (a test-only dependency)."""
    try:
        from tests.moshi_oracle import VOICES, build_moshi_checkpoint  # type: ignore[import-not-found]
    except Exception:
        return None
    ckpt = build_moshi_checkpoint(root)
    tts = ckpt.load_moshi(n_q=n_q, temp=temperature)
    entries = tts.prepare_script([TEXT], padding_between=1)
    attrs = tts.make_condition_attributes([ckpt.voice_path(VOICES[0])], cfg_coef=2.0)
    return tts, entries, attrs


def time_moshi(root: Path, batch: int, n_q: int, temperature: float) -> float | None:
    """Median ms between two frames of moshi's `TTSModel.generate` (its second run)."""
    loaded = _moshi(root / "moshi-time", n_q, temperature)
    if loaded is None:
        return None
    tts, entries, attrs = loaded
    stamps: list[float] = []
    tts.generate([entries] * batch, [attrs] * batch)
    tts.generate([entries] * batch, [attrs] * batch, on_frame=lambda *_: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False)) * 1000


def measure_moshi(root: Path, batch: int, n_q: int, temperature: float) -> tuple[float, float] | None:
    """moshi's `TTSModel.generate` on the same checkpoint: (ops, syncs) per step, or None without moshi."""
    loaded = _moshi(root / "moshi", n_q, temperature)
    if loaded is None:
        return None
    tts, entries, attrs = loaded
    counter = HostWorkCounter()
    steps = 0

    def on_frame(*_: object) -> None:
        nonlocal steps
        steps += 1

    with counter.counting():
        result = tts.generate([entries] * batch, [attrs] * batch, on_frame=on_frame)
    steps = max(steps, len(result.frames))
    return counter.ops / steps, counter.syncs / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--n-q", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--moshi", action="store_true", help="also count moshi's TTSModel.generate")
    parser.add_argument("--time", action="store_true", help="also median ms per step (and moshi's)")
    parser.add_argument("--compile", action="store_true", help="time our engine with compile=True")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_test_checkpoint(Path(tmp) / "tiny")
        print(f"tiny checkpoint, n_q {args.n_q}, temperature {args.temperature}, one thread")
        print(
            f"{'batch':>5} {'ops/step':>10} {'syncs/step':>11}"
            + ("   moshi ops/step  syncs/step" if args.moshi else "")
        )
        for b in args.batch:
            ops, syncs = measure_ours(root, b, args.n_q, args.temperature)
            line = f"{b:>5} {ops:>10.0f} {syncs:>11.1f}"
            if args.moshi:
                ref = measure_moshi(Path(tmp), b, args.n_q, args.temperature)
                line += "   n/a" if ref is None else f"   {ref[0]:>14.0f} {ref[1]:>11.1f}"
            if args.time:
                ms = time_ours(root, b, args.n_q, args.temperature, compile=args.compile)
                line += f"   ours {ms:.1f} ms/step"
                if args.moshi:
                    ref_ms = time_moshi(Path(tmp), b, args.n_q, args.temperature)
                    line += "" if ref_ms is None else f"   moshi {ref_ms:.1f} ms/step"
            print(line, flush=True)


if __name__ == "__main__":
    main()
