"""Host work per engine step: aten ops and device->host syncs, at batch 1, 16 and 64 (tiny checkpoint).

Counts, not time: the numbers do not depend on the machine. One thread. `--time` adds the median
milliseconds per step, measured in the same run (read the ratios), as "LM step + Mimi decoding": ours
are the steps where every session generates audio, split at the engine's one Mimi call; moshi's
`generate` does not decode, so its Mimi is timed frame by frame afterwards, as its `run_tts.py` does.

    PYTHONPATH=$PWD python3 benchmarks/bench_host_work.py [--batch 1 16 64] [--n-q 16] [--temperature 0.6]
        [--moshi] [--time] [--compile]
"""

from __future__ import annotations

import argparse
import json
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


def time_ours(
    root: Path, batch: int, n_q: int, temperature: float, **engine_kwargs: object
) -> tuple[float, float | None]:
    """Median ms of the steps where all `batch` sessions generate audio (after one warm-up run):
    (the whole step, the Mimi decoding inside it; None when compiled, Mimi being inside the graph)."""
    engine = _engine(root, batch, **engine_kwargs)
    times: list[tuple[float, float]] = []
    original = engine._step
    decoder = engine.generator.decoder
    original_decode = decoder.decode_span
    in_decode = [0.0]

    def decode_span(*args: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        out = original_decode(*args)
        in_decode[0] += time.perf_counter() - t0
        return out

    def step(sessions: list, *args: object) -> None:
        in_decode[0] = 0.0
        t0 = time.perf_counter()
        original(sessions, *args)
        if len(sessions) == batch and all(s.run is None or s.run.step > engine.delay_steps for s in sessions):
            times.append((time.perf_counter() - t0, in_decode[0]))

    compiled = bool(engine_kwargs.get("compile"))
    try:
        _run_sessions(engine, batch, n_q, temperature)  # warm-up (and compilation with --compile)
        engine._step = step  # type: ignore[method-assign]
        if not compiled:
            decoder.decode_span = decode_span  # type: ignore[method-assign]
        _run_sessions(engine, batch, n_q, temperature)
    finally:
        engine.close()
    mimi = None if compiled else statistics.median(d for _, d in times) * 1000
    return statistics.median(t for t, _ in times) * 1000, mimi


def _moshi(root: Path, n_q: int, temperature: float) -> tuple[Any, Any, Any] | None:
    """moshi's `TTSModel` on the same checkpoint as ours (same weights, so the same token
    distributions), with TEXT's entries and the conditions, or None without moshi (test-only)."""
    try:
        from tests.moshi_oracle import VOICES, MoshiCheckpoint  # type: ignore[import-not-found]
    except Exception:
        return None
    ckpt = MoshiCheckpoint(root, json.loads((root / "config.json").read_text()), root / "voices")
    tts = ckpt.load_moshi(n_q=n_q, temp=temperature)
    entries = tts.prepare_script([TEXT], padding_between=1)
    attrs = tts.make_condition_attributes([ckpt.voice_path(VOICES[0])], cfg_coef=2.0)
    return tts, entries, attrs


def time_moshi(root: Path, batch: int, n_q: int, temperature: float) -> tuple[float, float] | None:
    """moshi's `TTSModel.generate` (its second run): median ms between two frames, and median ms to
    decode one frame with its Mimi, streaming, frame by frame as its `run_tts.py` does after
    generating (`generate` itself does not decode)."""
    loaded = _moshi(root, n_q, temperature)
    if loaded is None:
        return None
    tts, entries, attrs = loaded
    stamps: list[float] = []
    tts.generate([entries] * batch, [attrs] * batch)
    result = tts.generate(
        [entries] * batch, [attrs] * batch, on_frame=lambda *_: stamps.append(time.perf_counter())
    )
    decode: list[float] = []
    with torch.no_grad(), tts.mimi.streaming(batch):
        for frame in result.frames[tts.delay_steps :]:
            t0 = time.perf_counter()
            tts.mimi.decode(frame[:, 1:])
            decode.append(time.perf_counter() - t0)
    step = statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    return step * 1000, statistics.median(decode) * 1000


def measure_moshi(root: Path, batch: int, n_q: int, temperature: float) -> tuple[float, float] | None:
    """moshi's `TTSModel.generate` on the same checkpoint: (ops, syncs) per step, or None without moshi."""
    loaded = _moshi(root, n_q, temperature)
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
                ref = measure_moshi(root, b, args.n_q, args.temperature)
                line += "   n/a" if ref is None else f"   {ref[0]:>14.0f} {ref[1]:>11.1f}"
            if args.time:
                ms, mimi_ms = time_ours(root, b, args.n_q, args.temperature, compile=args.compile)
                split = (
                    f"{ms:.1f} (compiled, Mimi inside)"
                    if mimi_ms is None
                    else f"{ms - mimi_ms:.1f} + Mimi {mimi_ms:.1f}"
                )
                line += f"   ours {split} ms/step"
                if args.moshi:
                    ref = time_moshi(root, b, args.n_q, args.temperature)
                    line += "" if ref is None else f"   moshi {ref[0]:.1f} + Mimi {ref[1]:.1f} ms/step"
            print(line, flush=True)


if __name__ == "__main__":
    main()
