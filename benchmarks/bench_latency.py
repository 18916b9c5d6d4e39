"""First-audio latency and memory per session of the real-size engine (random weights), next to the
time moshi's reference path needs for the same first frame (19 LM steps, 16 of them backbone-only,
then one Mimi decode).

    python benchmarks/bench_latency.py --dtype float32 --n-q 32 --runs 3

"Text ready": the whole text is pushed and flushed at t=0. "Streamed": words arrive at LLM pace
(one word every `--word-interval` s) from t=0, and the first audio is timed from the first word.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kyutai_tts_plugin.checkpoint import VoiceLibrary  # noqa: E402
from kyutai_tts_plugin.configs import REAL_LM_CONFIG  # noqa: E402
from kyutai_tts_plugin.engine import TTSEngine  # noqa: E402
from kyutai_tts_plugin.lm import LMModel, LMShape, load_lm, quantize_int8  # noqa: E402
from kyutai_tts_plugin.mimi import REAL_MIMI_CONFIG, MimiModel, random_mimi_state_dict  # noqa: E402
from kyutai_tts_plugin.testing import train_test_tokenizer, write_test_voices  # noqa: E402
from kyutai_tts_plugin.text import TextTokenizer  # noqa: E402
from kyutai_tts_plugin.types import AudioChunk, SessionOptions  # noqa: E402

TEXT = "Hello there, this is a latency test of the streaming engine with a dozen words."


def build(dtype: torch.dtype, quantize: bool):
    from moshi.models import loaders

    ref = loaders.get_moshi_lm(None, lm_kwargs=copy.deepcopy(REAL_LM_CONFIG), device="cpu", dtype=dtype)
    with torch.device("meta"):
        ours = LMModel(LMShape.from_config(copy.deepcopy(REAL_LM_CONFIG)))
    ours = load_lm(ours, ref.state_dict(), "moshi", dtype, "cpu")
    if quantize:
        quantize_int8(ours)
    mimi_state = random_mimi_state_dict(REAL_MIMI_CONFIG, seed=0)
    mimi = MimiModel(REAL_MIMI_CONFIG)
    mimi.load_checkpoint(mimi_state, "random")
    ref_mimi = loaders.get_mimi(None, REAL_MIMI_CONFIG.to_dict(), num_codebooks=32)
    ref_mimi.load_state_dict(mimi_state)
    return ref, ours, mimi.eval(), ref_mimi


def engine_for(ours: LMModel, mimi: MimiModel, workdir: Path) -> TTSEngine:
    tok = workdir / "tok.model"
    train_test_tokenizer(tok)
    config = {"conditioners": REAL_LM_CONFIG["conditioners"], "model_id": {"sig": "bench", "epoch": 0}}
    voices = write_test_voices(workdir / "voices", config=config, voices=["bench.wav"])
    library = VoiceLibrary(voices, suffix=".bench@0.safetensors")
    tts_config = {"audio_delay": 1.28, "second_stream_ahead": 2}
    return TTSEngine(
        ours,
        mimi,
        TextTokenizer.from_file(tok),
        library,
        tts_config,
        device=torch.device("cpu"),
        default_voice="bench.wav",
        max_sessions=1,
    )


def first_audio(engine: TTSEngine, opts: SessionOptions, word_interval: float | None) -> float:
    session = engine.open_session(opts)
    t0 = time.perf_counter()
    if word_interval is None:
        session.push_text(TEXT)
        session.flush()
        for ev in session:
            if isinstance(ev, AudioChunk):
                break
    else:
        words = TEXT.split(" ")
        got = None
        for i, w in enumerate(words):
            session.push_text(w + " ")
            deadline = t0 + (i + 1) * word_interval
            while time.perf_counter() < deadline:
                if session._buffered() and got is None:
                    got = time.perf_counter()
                time.sleep(0.002)
        session.flush()
        for ev in session:
            if isinstance(ev, AudioChunk):
                break
        if got is not None:
            session.cancel()
            return got - t0
    dt = time.perf_counter() - t0
    session.cancel()
    return dt


def moshi_first_audio(ref, ref_mimi, n_q: int) -> float:
    from moshi.conditioners import ConditionAttributes, TensorCondition
    from moshi.models.lm import LMGen

    ref.dep_q = n_q
    voice = torch.randn(1, 625, 512)
    mask = torch.zeros(1, 625, dtype=torch.bool)
    mask[:, :125] = True
    attrs = ConditionAttributes(
        text={"control": "ok", "cfg": "2.0"}, tensor={"speaker_wavs": TensorCondition(voice, mask)}
    )
    gen = LMGen(
        ref, temp=0.6, temp_text=0.6, condition_tensors=ref.condition_provider.prepare_and_provide([attrs])
    )
    inp = torch.full((1, ref.n_q - n_q, 1), -1, dtype=torch.long)
    skip = torch.full((1, n_q, 1), -1, dtype=torch.long)
    ref_mimi.set_num_codebooks(n_q)
    t0 = time.perf_counter()
    with gen.streaming(1), ref_mimi.streaming(1), torch.no_grad():
        for step in range(19):
            frame = gen.step(inp, depformer_replace_tokens=skip if step < 16 else None)
        assert frame is not None
        ref_mimi.decode(frame[:, 1:, :].clamp(min=0))
    ref.dep_q = ref.n_q
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quantize", choices=["int8"], default=None)
    ap.add_argument("--n-q", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--word-interval", type=float, default=0.05, help="LLM pace for the streamed case (s/word)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    ref, ours, mimi, ref_mimi = build(dtype, args.quantize == "int8")
    with tempfile.TemporaryDirectory() as tmp:
        engine = engine_for(ours, mimi, Path(tmp))
        opts = SessionOptions(n_q=args.n_q)
        ready = [first_audio(engine, opts, None) for _ in range(args.runs)]
        streamed = [first_audio(engine, opts, args.word_interval) for _ in range(args.runs)]
        lm_state = engine.generator.lm_state
        kv_bytes = sum(t.numel() * t.element_size() for t in lm_state.k + lm_state.v)
        buffers = engine.generator.decoder.state.buffers.values()
        mimi_bytes = sum(t.numel() * t.element_size() for t in buffers) / engine.max_sessions
        engine.close()
    ref_times = [moshi_first_audio(ref, ref_mimi, args.n_q) for _ in range(args.runs)]
    med = statistics.median
    label = args.dtype + (" + int8 weights (ours)" if args.quantize else "")
    lines = [
        f"### First audio and memory per session, real-size random weights, {label}, n_q {args.n_q}, "
        f"{date.today()}",
        "",
        f"Command: `python benchmarks/bench_latency.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; median of {args.runs} runs, batch 1.",
        "",
        "| measure | ours | moshi reference path |",
        "|---|---:|---:|",
        f"| first audio, text ready (s) | {med(ready):.2f} | {med(ref_times):.2f} |",
        f"| first audio, words streamed every {args.word_interval * 1000:.0f} ms (s, from first word) | "
        f"{med(streamed):.2f} | — |",
        f"| backbone KV cache per session (MB) | {kv_bytes / 2**20:.0f} | — |",
        f"| Mimi decoder state per session (MB) | {mimi_bytes / 2**20:.1f} | — |",
        "",
    ]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
