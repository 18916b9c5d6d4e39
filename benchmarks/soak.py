"""Soak test of the in-process engine on the tiny random-weight model (a benchmark, not a test).

N client threads (default 64) keep sessions in flight on a 16-slot engine for M minutes (default 10),
each running one session after another, drawn at random: words trickled in (split mid-word, random
gaps), whole texts, random flushes, cancels from another thread, slow readers, sessions dropped
without flush or cancel, sampled sessions, and bad options. Reports: sessions run, greedy sessions
whose audio differs from a solo run of the same text and voice, slot leaks (sessions still counted
once every client is done), worker deaths (worker thread gone or engine unhealthy), RSS at start
and end. Appends a section to benchmarks/RESULTS.md unless --no-write.

    python benchmarks/soak.py [--minutes 10] [--clients 64] [--slots 16] [--seed 0] [--no-write]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kyutai_tts_plugin.engine import StreamingSession, TTSEngine  # noqa: E402
from kyutai_tts_plugin.errors import (  # noqa: E402
    EngineFullError,
    EngineTimeoutError,
    InvalidInputError,
    KyutaiTTSError,
)
from kyutai_tts_plugin.testing import TEST_VOICES, make_test_checkpoint  # noqa: E402
from kyutai_tts_plugin.types import AudioChunk, SessionOptions  # noqa: E402

TEXTS = [
    "Hello there, how are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "Streaming speech synthesis for voice agents, one word at a time.",
    "Short one.",
    "A slightly longer sentence, with commas, pauses and several clauses to speak.",
]
GREEDY_N_Q = 4
# A batched decoder differs from a solo one by float rounding only; more than this is a mismatch.
PCM_TOLERANCE = 1e-5
BAD_OPTIONS = [
    {"seed": 2**64, "temperature": 0.6},
    {"top_k": 2.5},
    {"n_q": 2.5},
    {"temperature": 1e-320},
    {"cfg_coef": float("nan")},
    {"voice": "no/such/voice.wav"},
]
KINDS = {  # kind: weight
    "trickle": 30,
    "whole": 15,
    "slow_reader": 10,
    "cancel": 15,
    "drop": 5,
    "sampled": 10,
    "bad_options": 10,
    "bad_break": 5,
}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_all(session: StreamingSession, slow: random.Random | None = None) -> np.ndarray:
    pcm = []
    for event in session:
        if isinstance(event, AudioChunk):
            pcm.append(event.pcm)
            if slow is not None:
                time.sleep(slow.uniform(0.0, 0.05))  # a reader behind real time
    return np.concatenate(pcm) if pcm else np.zeros(0, np.float32)


class Soak:
    def __init__(self, engine: TTSEngine, references: dict[tuple[str, str], np.ndarray], seed: int) -> None:
        self.engine = engine
        self.references = references
        self.seed = seed
        self.counts: Counter[str] = Counter()
        self.mismatches: list[str] = []
        self.unexpected: list[str] = []
        self.refusals: list[str] = []
        self.lock = threading.Lock()

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def client(self, index: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        kinds, weights = zip(*KINDS.items(), strict=True)
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            try:
                self.run_one(kind, rng)
                self.count(kind)
            except (EngineFullError, EngineTimeoutError) as e:
                self.count(f"refused ({type(e).__name__})")
                with self.lock:
                    self.refusals.append(str(e))
                time.sleep(rng.uniform(0.05, 0.2))
            except Exception as e:  # anything else is a finding
                with self.lock:
                    self.unexpected.append(f"{kind}: {type(e).__name__}: {e}")

    def run_one(self, kind: str, rng: random.Random) -> None:
        text = rng.choice(TEXTS)
        voice = rng.choice(TEST_VOICES)
        greedy = SessionOptions(temperature=0.0, n_q=GREEDY_N_Q, voice=voice)
        if kind == "bad_options":
            try:
                self.engine.open_session(SessionOptions(**rng.choice(BAD_OPTIONS)))  # type: ignore[arg-type]
            except InvalidInputError:
                return
            raise AssertionError("bad options were accepted")
        if kind == "bad_break":
            s = self.engine.open_session(greedy)
            try:
                s.push_text('wait <break time="99999s"/> for it')
            except InvalidInputError:
                s.cancel()
                return
            raise AssertionError("a 28-hour break was accepted")
        if kind == "sampled":
            s = self.engine.open_session(
                temperature=0.6, n_q=GREEDY_N_Q, voice=voice, seed=rng.randrange(2**32)
            )
            s.push_text(text)
            s.flush()
            read_all(s)
            return
        s = self.engine.open_session(greedy)
        if kind == "drop":
            s.push_text(text[: len(text) // 2])
            del s  # no flush, no cancel: the finalizer must free the slot
            return
        if kind == "cancel":
            s.push_text(text)
            if rng.random() < 0.5:
                s.flush()
            timer = threading.Timer(rng.uniform(0.0, 0.5), s.cancel)  # cancel from another thread
            timer.start()
            try:
                read_all(s)
            except KyutaiTTSError:
                pass
            timer.join()
            return
        if kind == "whole":
            s.push_text(text)
        else:  # trickle / slow_reader: split anywhere, with gaps like an LLM's
            pos = 0
            while pos < len(text):
                step = rng.randint(1, 6)
                s.push_text(text[pos : pos + step])
                pos += step
                time.sleep(rng.uniform(0.0, 0.02))
        s.flush()
        pcm = read_all(s, rng if kind == "slow_reader" else None)
        ref = self.references[(text, voice)]
        if pcm.shape != ref.shape or (pcm.size and float(np.abs(pcm - ref).max()) > PCM_TOLERANCE):
            with self.lock:
                self.mismatches.append(f"{kind} {voice!r} {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64, help="sessions in flight")
    parser.add_argument("--slots", type=int, default=16, help="engine max_sessions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    # The engine's "slower than real time" warning fires for most sessions on a loaded CPU: keep errors.
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = make_test_checkpoint(Path(tmp) / "tiny")
        engine = TTSEngine.from_pretrained(
            root,
            voice_repo=root / "voices",
            max_sessions=args.slots,
            max_waiting=args.clients,
            queue_timeout_s=120.0,
            idle_timeout_s=30.0,
        )
        references = {
            (text, voice): engine.synthesize(
                text, SessionOptions(temperature=0.0, n_q=GREEDY_N_Q, voice=voice)
            ).pcm
            for text in TEXTS
            for voice in TEST_VOICES
        }
        soak = Soak(engine, references, args.seed)
        started = time.monotonic()
        deadline = started + args.minutes * 60
        clients = [
            threading.Thread(target=soak.client, args=(i, deadline), daemon=True) for i in range(args.clients)
        ]
        for c in clients:
            c.start()
        # RSS "at start" is taken once the run is warm (threads started, allocator caches and voice
        # cache filled): growth after that is what a leak looks like.
        time.sleep(min(60.0, args.minutes * 60 * 0.25))
        gc.collect()
        rss_start = rss_mb()
        for c in clients:
            c.join()
        elapsed = time.monotonic() - started
        gc.collect()
        engine._notify_worker()
        settle = time.monotonic() + 10  # the worker frees dropped sessions' slots within a poll
        while engine.active_sessions and time.monotonic() < settle:
            time.sleep(0.1)
        leaks = engine.active_sessions
        deaths = int(not engine._worker.is_alive()) + int(not engine.healthy)
        gc.collect()
        rss_end = rss_mb()
        engine.close()

    sessions = sum(n for k, n in soak.counts.items() if k in KINDS)
    growth = (rss_end - rss_start) / rss_start * 100
    lines = [
        f"- sessions run: {sessions} in {elapsed / 60:.1f} min ("
        + ", ".join(f"{k} {n}" for k, n in sorted(soak.counts.items()))
        + ")",
        f"- greedy sessions whose audio differs from a solo run: {len(soak.mismatches)}",
        f"- slot leaks (sessions still counted after every client ended): {leaks}",
        f"- worker deaths / unhealthy engine: {deaths}",
        f"- unexpected errors: {len(soak.unexpected)}",
        f"- RSS: {rss_start:.0f} MB once warm, {rss_end:.0f} MB at end ({growth:+.1f}%)",
    ]
    print("\n".join(lines))
    for m in soak.mismatches[:10]:
        print("  mismatch:", m)
    for u in soak.unexpected[:10]:
        print("  unexpected:", u)
    for r in sorted(set(soak.refusals))[:5]:
        print("  refused:", r)
    if not args.no_write:
        cmd = "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or platform.system()})"
        date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = (
            f"\n## Soak: {args.clients} sessions in flight on {args.slots} slots, tiny model, in-process\n\n"
            f"`{cmd.strip()}` on {machine}, torch {torch.__version__}, {date}.\n\n" + "\n".join(lines) + "\n"
        )
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(section)
    failed = soak.mismatches or leaks or deaths or soak.unexpected
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
