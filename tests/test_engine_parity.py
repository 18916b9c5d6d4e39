"""Token-exact parity of our engine with Kyutai's reference package (moshi 0.2.13) on tiny models."""

from __future__ import annotations

import copy
import os
import random

import numpy as np
import pytest
import torch

from kyutai_tts_plugin.configs import REAL_LM_CONFIG
from kyutai_tts_plugin.engine import StreamingSession, TTSEngine
from kyutai_tts_plugin.generator import attended_cells
from kyutai_tts_plugin.lm import LMModel, LMShape
from kyutai_tts_plugin.testing import StepRecorder
from kyutai_tts_plugin.types import AudioChunk, SessionOptions, WordTiming

from .moshi_oracle import VOICES, MoshiCheckpoint, build_moshi_checkpoint

os.environ.setdefault("NO_TORCH_COMPILE", "1")

WORDS = (
    "the quick brown fox jumps over a lazy dog while seven bright stars shine above "
    "quiet hills, and people talk about music, food, travel and 42 small things; "
    "bonjour mes amis, il fait beau aujourd'hui à Paris. "
).split()


def long_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> MoshiCheckpoint:
    return build_moshi_checkpoint(tmp_path_factory.mktemp("moshi-ckpt"))


@pytest.fixture(scope="module")
def engine(oracle: MoshiCheckpoint):
    eng = TTSEngine.from_pretrained(
        oracle.root, voice_repo=oracle.voices_dir, max_sessions=4, default_voice=VOICES[0]
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def rec(engine: TTSEngine):
    with StepRecorder(engine) as recorder:
        yield recorder


def run_moshi(
    oracle: MoshiCheckpoint,
    text: str,
    *,
    n_q: int,
    temp: float = 0.0,
    voice: str = VOICES[0],
    cfg: float = 2.0,
    seed: int | None = None,
):
    tts = oracle.load_moshi(n_q=n_q, temp=temp)
    entries = tts.prepare_script([text], padding_between=1)
    attrs = tts.make_condition_attributes([oracle.voice_path(voice)], cfg_coef=cfg)
    if seed is not None:
        torch.manual_seed(seed)
    result = tts.generate([entries], [attrs])
    return tts, result


def run_ours(
    engine: TTSEngine, text: str, **opts
) -> tuple[StreamingSession, list[np.ndarray], list[WordTiming]]:
    session = engine.open_session(SessionOptions(**opts))
    session.push_text(text)
    session.flush()
    chunks, words = collect(session)
    return session, chunks, words


def collect(session: StreamingSession) -> tuple[list[np.ndarray], list[WordTiming]]:
    chunks, words = [], []
    for ev in session:
        if isinstance(ev, AudioChunk):
            chunks.append(ev.pcm)
        else:
            words.append(ev)
    return chunks, words


def our_frames(rec: list, n_q: int) -> list[list[int]]:
    """Undelayed frames from our step records, laid out like moshi's TTSResult.frames."""
    frames = []
    for i in range(len(rec) - 2):
        frames.append([rec[i].fed_text, rec[i].audio[0], *rec[i + 2].audio[1:n_q]])
    return frames


def assert_same_run(recorder: StepRecorder, session: StreamingSession, result, n_q: int) -> None:
    rec = recorder.of(session)
    logged = result.logged_text_tokens[0]
    assert len(rec) >= len(logged)
    ours_text = [(r.sampled_text, r.fed_text) for r in rec[: len(logged)]]
    assert ours_text == [tuple(x) for x in logged]
    moshi_frames = [f[0, :, 0].tolist() for f in result.frames]
    assert our_frames(rec, n_q)[: len(moshi_frames)] == moshi_frames
    st = rec[-1].dsm_state
    assert st.end_step == result.end_steps[0]
    assert st.consumption_steps == result.all_consumption_times[0]
    assert st.transcript == [tuple(t) for t in result.all_transcripts[0]]


@pytest.mark.parametrize("n_q", [32, 24, 8])
def test_greedy_tokens_match_moshi_past_the_kv_window(oracle, engine, rec, n_q):
    text = long_text(75, seed=n_q)
    _, result = run_moshi(oracle, text, n_q=n_q)
    session, chunks, _ = run_ours(engine, text, n_q=n_q, temperature=0.0)
    assert len(result.frames) > 600, "the run must go past the 500-step attention window"
    assert_same_run(rec, session, result, n_q)
    # The server rule runs 2 steps past generate(): end_step + 16 + 4 + 2 steps in all.
    assert rec.count(session) == result.end_steps[0] + 16 + 4 + 2


def test_attended_cells_hold_every_position_until_the_ring_is_full():
    """The run above crosses each size (64, 128, 256, the whole ring, then the wrap) and stays equal
    to moshi, which always reads the whole ring; here, the sizes themselves."""
    lengths = [1, 64, 65, 128, 129, 256, 257, 500, 501, 10_000]
    cells = [attended_cells(n, 500) for n in lengths]
    assert all(c >= min(n, 500) for n, c in zip(lengths, cells, strict=True))
    assert cells == [64, 64, 128, 128, 256, 256, 500, 500, 500, 500]
    assert attended_cells(3, 32) == 32  # a context below the smallest size: the whole ring


def test_pcm_matches_moshi_streaming_decode(oracle, engine):
    text = long_text(10, seed=5)
    tts, result = run_moshi(oracle, text, n_q=32)
    _, chunks, _ = run_ours(engine, text, n_q=32, temperature=0.0)
    with tts.mimi.streaming(1), torch.no_grad():
        ref = [tts.mimi.decode(f[:, 1:, :]).clamp(-1, 1)[0, 0].numpy() for f in result.frames[16:]]
    assert len(chunks) >= len(ref) > 10
    diff = np.abs(np.stack(chunks[: len(ref)]) - np.stack(ref)).max()
    assert diff <= 1e-5, diff


def test_word_timings_are_consumption_steps(oracle, engine):
    text = "hello there, general Kenobi! (you are) a bold one: 42 times \n "
    _, result = run_moshi(oracle, text, n_q=8)
    session, chunks, words = run_ours(engine, text, n_q=8, temperature=0.0)
    transcript = result.all_transcripts[0]
    assert [w.word for w in words] == [t[0] for t in transcript]
    assert [w.start_s for w in words] == pytest.approx([t[1] * 0.08 for t in transcript])
    ends = [t[1] * 0.08 for t in transcript[1:]] + [result.end_steps[0] * 0.08]
    assert [w.end_s for w in words] == pytest.approx(ends)
    assert "".join(w.text for w in words) == text
    # each timing comes before the chunk in which its word starts
    assert len(chunks) == result.end_steps[0] + 4


def test_streamed_words_equal_whole_text(engine, rec):
    text = long_text(30, seed=9)
    whole, whole_chunks, whole_words = run_ours(engine, text, n_q=8, temperature=0.0)
    session = engine.open_session(SessionOptions(n_q=8, temperature=0.0))
    rng = random.Random(1)
    pos = 0
    while pos < len(text):  # LLM-like fragments, split mid-word
        n = rng.randint(1, 6)
        session.push_text(text[pos : pos + n])
        pos += n
    session.flush()
    chunks, words = collect(session)
    assert rec.tokens(session) == rec.tokens(whole)
    assert np.array_equal(np.concatenate(chunks), np.concatenate(whole_chunks))
    assert words == whole_words


def test_streaming_waits_for_three_words(engine, rec):
    session = engine.open_session(SessionOptions(n_q=8, temperature=0.0))
    session.push_text("one two ")
    # Another session speaks to its end meanwhile: every one of its steps was a chance to step ours.
    other = engine.open_session(SessionOptions(n_q=8, temperature=0.0))
    other.push_text("a whole sentence that is flushed")
    other.flush()
    collect(other)
    assert rec.count(other) > 20
    assert rec.count(session) == 0, "must not step with fewer than 3 words"
    session.push_text("three four ")
    rec.wait_for(lambda: rec.count(session) > 0, "a step of the session once it had enough words")
    session.cancel()


def test_batch_of_sessions_equals_solo_runs(engine, rec):
    specs = [
        (long_text(12, seed=21), dict(voice=VOICES[0], cfg_coef=2.0, n_q=8)),
        (long_text(9, seed=22), dict(voice=VOICES[1], cfg_coef=1.5, n_q=16)),
        (long_text(15, seed=23), dict(voice=VOICES[2], cfg_coef=3.0, n_q=8, temperature=0.6, seed=7)),
    ]
    solo = []
    for text, opts in specs:
        o = {"temperature": 0.0, **opts}
        s, chunks, words = run_ours(engine, text, **o)
        solo.append((rec.tokens(s), np.concatenate(chunks), words))
    # Start them at different steps: each new one joins once the previous has produced audio.
    sessions = []
    for text, opts in specs:
        s = engine.open_session(SessionOptions(**{"temperature": 0.0, **opts}))
        s.push_text(text)
        s.flush()
        sessions.append(s)
        it = iter(s)
        first = [next(it)]
        sessions[-1] = (s, it, first)
    results = []
    for s, it, first in sessions:
        events = first + list(it)
        chunks = [e.pcm for e in events if isinstance(e, AudioChunk)]
        words = [e for e in events if isinstance(e, WordTiming)]
        results.append((rec.tokens(s), np.concatenate(chunks), words))
    for (toks, pcm, words), (stoks, spcm, swords) in zip(results, solo, strict=True):
        assert toks == stoks
        assert np.abs(pcm - spcm).max() <= 1e-5
        assert words == swords


def test_moshi_named_checkpoint_loads(tmp_path):
    ckpt = build_moshi_checkpoint(tmp_path / "moshi-names", seed=3, fused=False)
    eng = TTSEngine.from_pretrained(ckpt.root, voice_repo=ckpt.voices_dir, default_voice=VOICES[0])
    try:
        out = eng.synthesize("a short test", SessionOptions(n_q=4, temperature=0.0))
        assert out.pcm.shape[0] > 0 and [w.word for w in out.words] == ["a", "short", "test"]
    finally:
        eng.close()


def test_our_random_checkpoint_loads_in_moshi(tmp_path):
    from kyutai_tts_plugin.testing import make_test_checkpoint

    root = make_test_checkpoint(tmp_path / "ours")
    import json

    config = json.loads((root / "config.json").read_text())
    oracle = MoshiCheckpoint(root, config, root / "voices")
    text = "our own checkpoint in the real layout"
    _, result = run_moshi(oracle, text, n_q=8)
    eng = TTSEngine.from_pretrained(root, voice_repo=root / "voices", default_voice=VOICES[0])
    try:
        with StepRecorder(eng) as recorder:
            session, _, _ = run_ours(eng, text, n_q=8, temperature=0.0)
        assert_same_run(recorder, session, result, 8)
    finally:
        eng.close()


def test_real_size_inventory_on_meta_device():
    with torch.device("meta"):
        model = LMModel(LMShape.from_config(copy.deepcopy(REAL_LM_CONFIG)))
    state = model.state_dict()
    f32 = [k for k in state if k.startswith("condition_provider.")]
    assert len(state) == 418 and len(f32) == 8
    nbytes = sum(t.numel() * (4 if k in f32 else 2) for k, t in state.items())
    assert nbytes == 3_683_672_576
    assert sum(t.numel() for t in state.values()) == 1_836_550_272


def test_every_real_checkpoint_name_is_known():
    from moshi.models import loaders

    cfg = copy.deepcopy(REAL_LM_CONFIG)
    with torch.device("meta"):
        ref = loaders.get_moshi_lm(None, lm_kwargs=cfg, device="meta", dtype=torch.bfloat16)
        ours = LMModel(LMShape.from_config(cfg))
    from kyutai_tts_plugin.lm import _moshi_name_to_checkpoint

    ref_names = {k: tuple(v.shape) for k, v in _moshi_name_to_checkpoint(ref.state_dict()).items()}
    assert ref_names == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_dialog_and_breaks_match_moshi(oracle, engine, rec):
    turns = ["hello there, how are you?", 'fine <break time="0.5s"/> thanks, and you?', "great."]
    tts = oracle.load_moshi(n_q=8, temp=0.0)
    entries = tts.prepare_script(turns, padding_between=1)
    attrs = tts.make_condition_attributes(
        [oracle.voice_path(VOICES[1]), oracle.voice_path(VOICES[2])], cfg_coef=2.0
    )
    result = tts.generate([entries], [attrs])
    session = engine.open_session(
        SessionOptions(n_q=8, temperature=0.0, voice=VOICES[1], other_voice=VOICES[2])
    )
    for i, turn in enumerate(turns):
        if i:
            session.next_turn()
        session.push_text(turn)
    session.flush()
    collect(session)
    assert_same_run(rec, session, result, 8)
    consumed = rec.of(session)[-1].dsm_state.consumption_steps
    assert len(consumed) == len(entries)  # the pause entry is consumed like a word
