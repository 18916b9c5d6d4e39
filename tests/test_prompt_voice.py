"""The 0.75B layout (`kyutai/tts-0.75b-en-public`): a voice cloned from audio, as an audio prefix, with
real classifier-free guidance, checked token for token against moshi 0.2.13 on tiny random models."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kyutai_tts_plugin.engine import StreamingSession, TTSEngine
from kyutai_tts_plugin.errors import InvalidInputError
from kyutai_tts_plugin.testing import StepRecorder
from kyutai_tts_plugin.types import AudioChunk, SessionOptions, VoicePrompt, WordTiming

from .moshi_oracle import (
    VOICES,
    CounterNoise,
    MoshiCheckpoint,
    build_moshi_prefix_checkpoint,
    write_prompt_wav,
)
from .test_engine_parity import collect, our_frames

os.environ.setdefault("NO_TORCH_COMPILE", "1")

TEXT = "hello world, a cloned voice"


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> MoshiCheckpoint:
    return build_moshi_prefix_checkpoint(tmp_path_factory.mktemp("moshi-0.75b"))


@pytest.fixture(scope="module")
def engine(oracle: MoshiCheckpoint):
    # Every session computes its prompt's steps: the parity tests compare them with moshi's.
    eng = TTSEngine.from_pretrained(
        oracle.root,
        voice_repo=oracle.voices_dir,
        max_sessions=4,
        default_voice=VOICES[0],
        reuse_prompt_steps=False,
    )
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def rec(engine: TTSEngine):
    with StepRecorder(engine) as recorder:
        yield recorder


def run_moshi(oracle: MoshiCheckpoint, text: str, voice: Path, *, cfg: float, temp: float = 0.0):
    tts = oracle.load_moshi(n_q=16, temp=temp)
    tts.cfg_coef = cfg  # a model without a cfg table: real CFG, as simple_generate sets it
    prefix = tts.get_prefix(voice)
    entries = tts.prepare_script([text], padding_between=1)
    return tts, prefix, tts.generate([entries], [], prefixes=[prefix])


def run_ours(
    engine: TTSEngine, text: str, **opts
) -> tuple[StreamingSession, list[np.ndarray], list[WordTiming]]:
    session = engine.open_session(SessionOptions(**opts))
    session.push_text(text)
    session.flush()
    chunks, words = collect(session)
    return session, chunks, words


def assert_same_tokens(rec: StepRecorder, session: StreamingSession, result, b: int = 0) -> None:
    """Our session's steps are item `b` of moshi's run, up to where that item ended."""
    steps = rec.of(session)
    end = result.end_steps[b] + 16 + 4  # moshi keeps stepping an ended item while others speak
    logged = [tuple(x) for x in result.logged_text_tokens[b]][:end]
    assert [(r.sampled_text, r.fed_text) for r in steps[: len(logged)]] == logged
    moshi_frames = [f[b, :, 0].tolist() for f in result.frames][: end - 2]
    assert our_frames(steps, 16)[: len(moshi_frames)] == moshi_frames
    st = steps[-1].dsm_state
    assert st.end_step == result.end_steps[b]
    assert st.transcript == [tuple(t) for t in result.all_transcripts[b]]


@pytest.mark.parametrize("cfg", [1.0, 2.0], ids=["no-cfg", "cfg-2"])
def test_greedy_tokens_and_pcm_match_moshi_with_a_prompt_voice(oracle, engine, rec, cfg):
    voice = oracle.voices_dir / VOICES[0]
    tts, prefix, result = run_moshi(oracle, TEXT, voice, cfg=cfg)
    session, chunks, words = run_ours(engine, TEXT, voice=str(voice), temperature=0.0, cfg_coef=cfg)
    frames = prefix.shape[-1]
    # During the prefix the text is the zero token and the audio is the prompt's codes.
    assert [r.fed_text for r in rec.of(session)[:frames]] == [-1] * frames
    assert_same_tokens(rec, session, result)
    # The prompt's own audio is decoded but not sent: the session's audio starts after it.
    with tts.mimi.streaming(1), torch.no_grad():
        ref = [tts.mimi.decode(f[:, 1:, :]).clamp(-1, 1)[0, 0].numpy() for f in result.frames[16:]]
    ref = ref[frames:]
    assert len(chunks) >= len(ref) > 20
    assert np.abs(np.stack(chunks[: len(ref)]) - np.stack(ref)).max() <= 1e-5
    # Word timings are on the session's timeline: moshi's steps minus the prefix.
    transcript = result.all_transcripts[0]
    assert [w.word for w in words] == [t[0] for t in transcript]
    assert [w.start_s for w in words] == pytest.approx([(t[1] - frames) * 0.08 for t in transcript])
    assert words[0].start_s == pytest.approx(0.16)  # two forced pads after the prompt


def test_seeded_sampling_matches_moshi_under_the_same_noise(oracle, engine, rec, monkeypatch):
    from moshi.models import lm as moshi_lm

    voice = oracle.voices_dir / VOICES[1]
    seed = 1234
    monkeypatch.setattr(moshi_lm, "sample_token", CounterNoise(seed, text_vocab=5))
    _, _, result = run_moshi(oracle, TEXT, voice, cfg=2.0, temp=0.6)
    session, _, _ = run_ours(engine, TEXT, voice=str(voice), temperature=0.6, cfg_coef=2.0, seed=seed)
    assert_same_tokens(rec, session, result)
    # Sampling did sample: greedy decoding gives other tokens.
    greedy, _, _ = run_ours(engine, TEXT, voice=str(voice), temperature=0.0, cfg_coef=2.0)
    assert rec.tokens(greedy) != rec.tokens(session)


def test_two_cfg_sessions_in_one_batch_match_moshis_batch(oracle, engine, rec):
    # moshi steps a batch of 2 with CFG as 4 rows; two sessions admitted at the same engine step
    # take 4 slots (each with its null branch) and step together: the same tokens, item by item.
    texts = ["the first of a batch", "and a second, longer one"]
    voices = [oracle.voices_dir / VOICES[1], oracle.voices_dir / VOICES[2]]
    tts = oracle.load_moshi(n_q=16, temp=0.0)
    tts.cfg_coef = 2.0
    prefixes = [tts.get_prefix(v) for v in voices]
    entries = [tts.prepare_script([t], padding_between=1) for t in texts]
    result = tts.generate(entries, [], prefixes=prefixes)
    options = [SessionOptions(voice=str(v), temperature=0.0, cfg_coef=2.0) for v in voices]
    sessions = admitted_together(engine, list(zip(texts, options, strict=True)))
    for s in sessions:
        collect(s)
    assert sorted(r for s in sessions for r in (s.run.row, s.run.null_row)) == [0, 1, 2, 3]
    for b, s in enumerate(sessions):
        assert_same_tokens(rec, s, result, b)
    assert rec.engine_indices(sessions[0])[0] == rec.engine_indices(sessions[1])[0]


def admitted_together(engine: TTSEngine, specs: list[tuple[str, SessionOptions]]) -> list[StreamingSession]:
    """Open sessions that join the batch at the same engine step: the worker is parked (after a step
    of a filler session) until every prompt is encoded."""
    from kyutai_tts_plugin.testing import StepGate

    with StepGate(engine, held=True) as gate:
        filler = engine.open_session(SessionOptions(temperature=0.0, cfg_coef=1.0))
        filler.push_text("a filler that holds the worker")
        filler.flush()
        gate.wait_held()
        sessions = [engine.open_session(o) for _, o in specs]
        for (text, _), s in zip(specs, sessions, strict=True):
            s.push_text(text)
            s.flush()
        with engine._cv:
            assert engine._cv.wait_for(lambda: all(s._voice_ready for s in sessions), timeout=120)
        filler.cancel()
    return sessions


def test_cfg_sessions_joining_a_batch_at_any_step_equal_their_solo_runs(oracle):
    # Sessions with and without a null branch join and leave a running batch at different steps and
    # in other slots than alone. Every step here spans all 8 slots: float32 CPU matmuls round a row
    # the same way for the same number of rows (not across numbers of rows, which would let a near-tie
    # flip a token), so any difference is a leak between rows or a bookkeeping error.
    eng = TTSEngine.from_pretrained(
        oracle.root,
        voice_repo=oracle.voices_dir,
        max_sessions=3,
        default_voice=VOICES[0],
        reuse_prompt_steps=False,
    )
    eng.generator.buckets = [eng.generator.lm_state.batch_size]
    specs = [
        ("the first of three", dict(voice=VOICES[0], cfg_coef=2.0)),
        ("one without guidance", dict(voice=VOICES[1], cfg_coef=1.0)),
        ("a seeded, sampled one", dict(voice=VOICES[2], cfg_coef=3.0, temperature=0.6, seed=9)),
    ]
    try:
        with StepRecorder(eng) as rec:
            solo = []
            for text, opts in specs:
                s, chunks, words = run_ours(eng, text, **{"temperature": 0.0, **opts})
                solo.append((rec.tokens(s), np.concatenate(chunks), words))
            sessions = []
            for text, opts in specs:  # each joins once the previous one has made its first audio
                s = eng.open_session(SessionOptions(**{"temperature": 0.0, **opts}))
                s.push_text(text)
                s.flush()
                it = iter(s)
                sessions.append((s, it, [next(it)]))
            for (s, it, first), (toks, pcm, words) in zip(sessions, solo, strict=True):
                events = first + list(it)
                assert rec.tokens(s) == toks
                got = np.concatenate([e.pcm for e in events if isinstance(e, AudioChunk)])
                assert got.shape == pcm.shape and np.abs(got - pcm).max() <= 1e-5
                assert [e for e in events if isinstance(e, WordTiming)] == words
            starts = [rec.engine_indices(s)[0] for s, _, _ in sessions]
            assert starts == sorted(starts) and len(set(starts)) == 3
            rows = [(s.run.row, s.run.null_row) for s, _, _ in sessions]
            assert sum(r is not None for _, r in rows) == 2  # cfg_coef 1.0 runs without a null branch
    finally:
        eng.close()


def test_a_prompts_steps_are_computed_once_and_reused(oracle, tmp_path):
    # The state after a prompt's steps depends on the prompt alone: a second session with the same
    # prompt (and CFG or not) starts from it, at step T, and continues exactly as the first did.
    # (Every step spans all slots, as in the test above, so that float rounding is the same.)
    eng = TTSEngine.from_pretrained(
        oracle.root, voice_repo=oracle.voices_dir, max_sessions=2, default_voice=VOICES[0]
    )
    eng.generator.buckets = [eng.generator.lm_state.batch_size]
    # 3 s: longer than the text-to-audio delay, so the Mimi decoder's state is part of what is kept.
    voice = write_prompt_wav(tmp_path / "three-seconds.wav", 3.0, seed=11)
    try:
        with StepRecorder(eng) as rec:
            _, prefix, result = run_moshi(oracle, "said twice", voice, cfg=2.0)
            frames = prefix.shape[-1]
            for opts in (dict(cfg_coef=2.0, temperature=0.0), dict(cfg_coef=1.0, temperature=0.6, seed=3)):
                first, chunks1, words1 = run_ours(eng, "said twice", voice=str(voice), **opts)
                again, chunks2, words2 = run_ours(eng, "said twice", voice=str(voice), **opts)
                assert [r.step for r in rec.of(first)][:1] == [0]
                assert [r.step for r in rec.of(again)][:1] == [frames]  # the prompt's steps were skipped
                assert rec.tokens(again) == rec.tokens(first)[frames:]
                assert np.array_equal(np.stack(chunks2), np.stack(chunks1)) and words2 == words1
                if opts["cfg_coef"] == 2.0:
                    assert_same_tokens(rec, first, result)
            assert len(eng._prompt_states) == 2  # with and without a null branch
    finally:
        eng.close()


def test_voice_as_a_path_raw_pcm_a_name_resampled_or_mp3(oracle, engine, rec, tmp_path):
    wav = oracle.voices_dir / VOICES[0]
    pcm, rate = sf.read(str(wav), dtype="float32")
    assert rate == 24000
    by_path, _, _ = run_ours(engine, "same voice", voice=str(wav), temperature=0.0)
    by_pcm, _, _ = run_ours(engine, "same voice", voice=VoicePrompt(pcm, 24000), temperature=0.0)
    by_name, _, _ = run_ours(engine, "same voice", voice=VOICES[0], temperature=0.0)
    assert rec.tokens(by_pcm) == rec.tokens(by_path) == rec.tokens(by_name)
    # The voice library of such a model is its audio files, named by their paths (no model suffix).
    assert engine.list_voices() == sorted(VOICES)
    # Another rate is resampled to 24 kHz (soxr): 16 kHz int16 PCM and a 44.1 kHz MP3 both speak.
    low = (pcm[::3] * 32767).astype(np.int16)
    s16, chunks16, _ = run_ours(engine, "resampled voice", voice=VoicePrompt(low, 8000), temperature=0.0)
    assert chunks16 and rec.of(s16)[0].fed_text == -1
    mp3 = tmp_path / "prompt.mp3"
    write_prompt_wav(tmp_path / "p44.wav", 1.5, seed=5, sample_rate=44100)
    data, r44 = sf.read(str(tmp_path / "p44.wav"), dtype="float32")
    sf.write(str(mp3), data, r44, format="MP3")
    _, chunks_mp3, _ = run_ours(engine, "an mp3 voice", voice=str(mp3), temperature=0.0)
    assert chunks_mp3


def test_a_prompt_is_encoded_once_per_content(oracle, engine, tmp_path):
    encoder = engine._prompts
    assert encoder is not None
    copy_path = tmp_path / "copy.wav"
    copy_path.write_bytes((oracle.voices_dir / VOICES[2]).read_bytes())
    calls = []
    real = encoder.mimi.encode

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    encoder.mimi.encode = counting  # type: ignore[method-assign]
    encoder._cache.clear()
    try:
        for voice in (str(oracle.voices_dir / VOICES[2]), str(copy_path), VOICES[2]):
            engine.synthesize("once", SessionOptions(voice=voice, temperature=0.0))
    finally:
        del encoder.mimi.encode
    assert len(calls) == 1


def test_bad_prompts_are_refused_with_what_the_model_expects(oracle, engine, tmp_path):
    def refused(voice, match: str) -> str:
        with pytest.raises(InvalidInputError, match=match) as info:
            engine.open_session(SessionOptions(voice=voice))
        assert "audio prompt" in str(info.value)
        return str(info.value)

    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wav file")
    refused(str(garbage), "cannot be read as audio")
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, np.float32), 24000)
    refused(str(empty), "is empty")
    short = write_prompt_wav(tmp_path / "short.wav", 0.5)
    assert "1 to 20 s" in refused(str(short), "too short")
    long = write_prompt_wav(tmp_path / "long.wav", 21.0)
    refused(str(long), "too long")
    refused(VoicePrompt(np.zeros((100, 2), np.float32), 24000), "too short")
    refused(str(tmp_path / "voice.1e68beda@240.safetensors"), "speaker-embedding file")
    with pytest.raises(InvalidInputError, match="one voice"):
        engine.open_session(SessionOptions(voice=VOICES[0], other_voice=VOICES[1]))
    from kyutai_tts_plugin.remote import RemoteTTS

    with pytest.raises(InvalidInputError, match="RemoteTTS takes a voice name"):
        RemoteTTS("ws://127.0.0.1:1").open_session(SessionOptions(voice=VoicePrompt(np.zeros(24000))))
    # The engine keeps serving.
    assert engine.synthesize("still fine", SessionOptions(temperature=0.0)).pcm.size > 0


def test_both_model_kinds_in_one_process(oracle, engine, tiny_engine, tmp_path):
    prompt = str(oracle.voices_dir / VOICES[0])
    # A prompt for the embedding model (and the reverse above) names what each model takes.
    with pytest.raises(InvalidInputError, match="speaker embedding.*audio prompts"):
        tiny_engine.open_session(SessionOptions(voice=prompt))
    with pytest.raises(InvalidInputError, match="speaker embedding"):
        tiny_engine.open_session(SessionOptions(voice=VoicePrompt(np.zeros(24000, np.float32))))
    a = engine.open_session(SessionOptions(voice=prompt, temperature=0.0))
    b = tiny_engine.open_session(SessionOptions(temperature=0.0, n_q=8))
    for s in (a, b):
        s.push_text("two engines speaking at the same time")
        s.flush()
    out_a, out_b = collect(a), collect(b)
    assert out_a[0] and out_b[0]
    assert [w.word for w in out_a[1]] == [w.word for w in out_b[1]]


def test_real_size_inventory_of_the_published_config_on_meta_device():
    import json

    from moshi.models import loaders

    from kyutai_tts_plugin.checkpoint import TTSConfig
    from kyutai_tts_plugin.lm import LMModel, LMShape, _moshi_name_to_checkpoint

    path = Path(__file__).parent / "data" / "tts-0.75b-en-public.config.json"
    raw = json.loads(path.read_text())
    config = TTSConfig.from_dict(copy.deepcopy(raw))
    assert config.voice_kind == "prompt" and config.voice_suffix == "" and not config.cfg_values
    with torch.device("meta"):
        ours = LMModel(LMShape.from_config(raw))
    state = ours.state_dict()
    # The published file: 312 tensors, all bf16, 780,002,304 parameters.
    assert len(state) == 312
    assert sum(t.numel() for t in state.values()) == 780_002_304
    assert tuple(state["text_linear.weight"].shape) == (5, 1024)
    lm_kwargs = {k: v for k, v in raw.items() if k not in _NON_LM}
    with torch.device("meta"):
        ref = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device="meta", dtype=torch.bfloat16)
    ref_names = {k: tuple(v.shape) for k, v in _moshi_name_to_checkpoint(ref.state_dict()).items()}
    assert ref_names == {k: tuple(v.shape) for k, v in state.items()}


_NON_LM = {
    "moshi_name",
    "mimi_name",
    "tokenizer_name",
    "model_type",
    "lm_gen_config",
    "tts_config",
    "model_id",
}


# -- the server's Voice message ------------------------------------------------------------------


async def _speak(server, messages: list[bytes]) -> tuple[list[dict], int | None]:
    import aiohttp
    import msgpack

    from .test_server import HEADERS, finish

    http = aiohttp.ClientSession()
    ws = await http.ws_connect(
        f"{server.url}/api/tts_streaming?format=PcmMessagePack&temperature=0", headers=HEADERS
    )
    ws._test_http = http  # type: ignore[attr-defined]  # closed by `finish`
    for m in messages:
        await ws.send_bytes(m)
    await ws.send_bytes(msgpack.packb({"type": "Text", "text": "a voice sent over the socket"}))
    await ws.send_bytes(msgpack.packb({"type": "Eos"}))
    return await finish(ws)


async def test_server_voice_message_carries_an_audio_prompt(oracle, engine, tiny_engine, tmp_path):
    import msgpack

    from kyutai_tts_plugin.server import ServerLimits, start_server

    from .conftest import SERVER_TEST_KEY

    wav = oracle.voices_dir / VOICES[2]
    want = engine.synthesize("a voice sent over the socket", SessionOptions(voice=str(wav), temperature=0.0))
    server = await start_server(
        engine, api_keys=(SERVER_TEST_KEY,), limits=ServerLimits(allow_client_params=True)
    )
    embedding_server = await start_server(
        tiny_engine, api_keys=(SERVER_TEST_KEY,), limits=ServerLimits(allow_client_params=True)
    )
    try:
        for voice in (
            {"type": "Voice", "audio": wav.read_bytes()},
            {"type": "Voice", "pcm": sf.read(str(wav), dtype="float32")[0].tolist(), "sample_rate": 24000},
        ):
            messages, code = await _speak(server, [msgpack.packb(voice, use_single_float=True)])
            assert code == 1000, messages
            pcm = np.concatenate([np.asarray(m["pcm"], np.float32) for m in messages if m["type"] == "Audio"])
            assert pcm.shape == want.pcm.shape and np.abs(pcm - want.pcm).max() <= 1e-4
        short = write_prompt_wav(tmp_path / "short.wav", 0.4)
        bad = [
            ({"type": "Voice", "audio": short.read_bytes()}, server, "invalid_voice", "too short"),
            ({"type": "Voice", "audio": b"not audio"}, server, "invalid_voice", "cannot be read as audio"),
            ({"type": "Voice", "embeddings": [0.5], "shape": [1, 32, 1]}, server, "malformed_message",
             "audio prompt"),
            ({"type": "Voice", "audio": wav.read_bytes()}, embedding_server, "invalid_voice",
             "speaker embedding"),
        ]  # fmt: skip
        for voice, srv, code_name, text in bad:
            messages, _ = await _speak(srv, [msgpack.packb(voice)])
            errors = [m for m in messages if m["type"] == "Error"]
            assert len(errors) == 1 and errors[0]["code"] == code_name and text in errors[0]["message"], (
                messages
            )
    finally:
        await server.close()
        await embedding_server.close()


def test_cli_clones_a_voice_from_a_wav(oracle, tiny_checkpoint, tmp_path, capsys):
    from kyutai_tts_plugin.cli import main

    wav = oracle.voices_dir / VOICES[0]
    out = tmp_path / "out.wav"
    common = ["--text", "a cloned voice", "--out", str(out), "--temperature", "0", "--voice", str(wav)]
    args = ["synthesize", "--model", str(oracle.root), "--voice-repo", str(oracle.voices_dir), *common]
    assert main(args) == 0
    pcm, rate = sf.read(str(out), dtype="float32")
    assert rate == 24000 and pcm.shape[0] > 0
    # The 1.6B layout refuses it, saying what it takes instead.
    args = ["synthesize", "--model", str(tiny_checkpoint), "--voice-repo", str(tiny_checkpoint / "voices")]
    assert main([*args, *common]) == 2
    err = capsys.readouterr().err
    assert "speaker embedding" in err and "kyutai/tts-0.75b-en-public" in err


# -- the adapters: a WAV path as the voice setting -------------------------------------------------


async def test_pipecat_service_speaks_with_a_prompt_voice(oracle, engine):
    from pipecat.frames.frames import LLMFullResponseEndFrame

    from kyutai_tts_plugin.pipecat import KyutaiTTSService

    from .test_pipecat import assert_same_audio, audio_of, pcm16, run_bot, tokens_of

    wav = str(oracle.voices_dir / VOICES[1])
    reply = "A cloned voice in a pipeline."

    async def script(bot) -> None:
        await bot.say()
        await bot.recorder.wait_for(lambda: len(bot.recorder.down(LLMFullResponseEndFrame)) == 1)

    settings = KyutaiTTSService.Settings(voice=wav, temperature=0.0, cfg_coef=2.0)
    bot = await run_bot(engine, [tokens_of(reply)], script, settings=settings)
    expected = engine.synthesize(reply, SessionOptions(voice=wav, temperature=0.0, cfg_coef=2.0))
    assert_same_audio(audio_of(bot.recorder.down()), pcm16(expected.pcm))


async def test_livekit_tts_speaks_with_a_prompt_voice(oracle, engine):
    from livekit.agents import APIConnectOptions

    from kyutai_tts_plugin.livekit import TTS

    wav = str(oracle.voices_dir / VOICES[1])
    text = "A cloned voice for an agent."
    tts = TTS(engine=engine, voice=wav, temperature=0.0, cfg_coef=1.5)
    frames = [
        ev async for ev in tts.synthesize(text, conn_options=APIConnectOptions(max_retry=0, timeout=10))
    ]
    got = b"".join(bytes(ev.frame.data) for ev in frames)
    expected = engine.synthesize(text, SessionOptions(voice=wav, temperature=0.0, cfg_coef=1.5))
    want = AudioChunk(expected.pcm, 0.0).pcm16()
    # livekit's emitter may end the segment with silence up to its own frame size
    assert got[: len(want)] == want and not got[len(want) :].strip(b"\0")
