"""Bad input gets a clear error (or a clean, silent end), and never disturbs other sessions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kyutai_tts_plugin import dsm
from kyutai_tts_plugin.engine import StreamingSession, TTSEngine
from kyutai_tts_plugin.errors import (
    CheckpointError,
    InvalidInputError,
    SessionClosedError,
    VoiceNotFoundError,
)
from kyutai_tts_plugin.types import AudioChunk, SessionOptions

GREEDY = SessionOptions(temperature=0.0, n_q=4)


@pytest.mark.parametrize("text", ["", "   \n\t ", "🙂🚀", "\x00\x07 \u200b"])
def test_nothing_speakable_ends_cleanly_without_audio(tiny_engine, text):
    session = tiny_engine.open_session(GREEDY)
    session.push_text(text)
    session.flush()
    assert list(session) == []
    assert session.is_finished


def test_unknown_characters_are_dropped_not_fed_as_token_zero(tiny_engine):
    with_emoji = tiny_engine.open_session(GREEDY)
    with_emoji.push_text("hello 🙂 wor\x07ld🚀 again")
    with_emoji.flush()
    pcm_a = np.concatenate([e.pcm for e in with_emoji if isinstance(e, AudioChunk)])
    clean = tiny_engine.synthesize("hello world again", GREEDY)
    assert with_emoji.words == ["hello", "world🚀", "again"]  # the word as written; the emoji is not spoken
    assert np.array_equal(pcm_a, clean.pcm)
    assert all(0 not in e.tokens for e in _entries(tiny_engine, "hello 🙂 wor\x07ld🚀"))


def _entries(engine: TTSEngine, text: str) -> list[dsm.Entry]:
    """The entries the session's text path builds, read before the worker can take them: the
    session is never handed to the engine (an opened one may be admitted, emptying its inbox)."""
    s = StreamingSession(engine, GREEDY, [engine.default_voice])
    s.push_text(text)
    entries = [e for e, _ in s._inbox if e is not None]
    assert entries, "the text path built no entries"
    return entries


def test_unknown_voice_names_close_matches(tiny_engine):
    with pytest.raises(VoiceNotFoundError) as err:
        tiny_engine.open_session(SessionOptions(voice="expresso/ex03-ex01_happy_001_channel1_33s"))
    msg = str(err.value)
    assert "expresso/ex03-ex01_happy_001_channel1_334s.wav" in msg
    assert "list_voices" in msg or "kyutai-tts voices" in msg


def test_cfg_outside_checkpoint_values_lists_them(tiny_engine):
    with pytest.raises(
        InvalidInputError, match=r"cfg_coef=5.0 is not supported .* use one of 1, 1.5, 2, 2.5, 3, 3.5, 4"
    ):
        tiny_engine.open_session(SessionOptions(cfg_coef=5.0))


@pytest.mark.parametrize("n_q", [0, 33])
def test_n_q_out_of_range(tiny_engine, n_q):
    with pytest.raises(InvalidInputError, match=r"n_q=.* is out of range; use 1..32"):
        tiny_engine.open_session(SessionOptions(n_q=n_q))


def test_text_after_flush_or_cancel_is_refused(tiny_engine):
    flushed = tiny_engine.open_session(GREEDY)
    flushed.push_text("one two three")
    flushed.flush()
    with pytest.raises(SessionClosedError, match="was flushed; open a new session for new text"):
        flushed.push_text(" four")
    list(flushed)
    cancelled = tiny_engine.open_session(GREEDY)
    cancelled.cancel()
    with pytest.raises(SessionClosedError, match="was cancelled; open a new session for new text"):
        cancelled.push_text("hello")
    typed = tiny_engine.open_session(GREEDY)
    with pytest.raises(InvalidInputError, match="push_text expects a str"):
        typed.push_text(b"bytes")  # type: ignore[arg-type]
    typed.cancel()
    assert tiny_engine.active_sessions == 0


def test_bad_session_does_not_disturb_a_running_one(tiny_engine):
    text = "a steady voice keeps talking while others fail"
    good = tiny_engine.open_session(GREEDY)
    good.push_text(text)
    for bad in (SessionOptions(cfg_coef=9.0), SessionOptions(voice="nope"), SessionOptions(n_q=99)):
        with pytest.raises(InvalidInputError):
            tiny_engine.open_session(bad)
    empty = tiny_engine.open_session(GREEDY)
    empty.flush()
    good.flush()
    pcm = np.concatenate([e.pcm for e in good if isinstance(e, AudioChunk)])
    assert np.array_equal(pcm, tiny_engine.synthesize(text, GREEDY).pcm)


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _lm_file(root: Path) -> Path:
    return next(p for p in root.glob("dsm_tts_*.safetensors"))


def test_lm_tensor_with_wrong_shape_names_file_and_key(tiny_checkpoint, tmp_path):
    root = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    state = load_file(_lm_file(root))
    state["text_linear.weight"] = state["text_linear.weight"][:-1].contiguous()
    save_file(state, _lm_file(root))
    with pytest.raises(
        CheckpointError, match=r"dsm_tts_.*\.safetensors: tensor 'text_linear.weight' has shape"
    ):
        TTSEngine.from_pretrained(root, voice_repo=root / "voices")


def test_lm_tensor_missing_or_wrong_dtype(tiny_checkpoint, tmp_path):
    root = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    state = load_file(_lm_file(root))
    del state["out_norm.alpha"]
    save_file(state, _lm_file(root))
    with pytest.raises(CheckpointError, match=r"missing tensor 'out_norm.alpha'"):
        TTSEngine.from_pretrained(root, voice_repo=root / "voices")
    state["out_norm.alpha"] = torch.ones(1, 1, 64, dtype=torch.int32)
    save_file(state, _lm_file(root))
    with pytest.raises(
        CheckpointError, match=r"tensor 'out_norm.alpha' has dtype torch.int32, expected a float"
    ):
        TTSEngine.from_pretrained(root, voice_repo=root / "voices")


def test_truncated_lm_file_names_the_file(tiny_checkpoint, tmp_path):
    root = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    path = _lm_file(root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=path.name):
        TTSEngine.from_pretrained(root, voice_repo=root / "voices")


@pytest.mark.parametrize("seed", range(40))
def test_a_word_end_known_ahead_is_where_the_next_word_starts(seed):
    # The engine times a word before the next one starts when the state machine says that start can
    # no longer move (`next_start`); whatever the model then chooses, the next word starts there.
    rng = np.random.default_rng(seed)
    machine = dsm.StateMachine(text_card=8001, second_stream_ahead=2)
    state = machine.new_state()
    n_tokens: dict[str, int] = {}
    for i in range(12):
        if rng.random() < 0.15:
            state.entries.append(dsm.Entry((), "", int(rng.integers(1, 6))))  # a <break>
        n = n_tokens[f"w{i}"] = int(rng.integers(1, 30))  # some words outlast the maximum padding
        state.entries.append(dsm.Entry(tuple(range(10, 10 + n)), f"w{i}", n))
    predicted: dict[int, tuple[int, int]] = {}  # word index -> (its end, the step it was known at)
    step = 0
    while state.end_step is None:
        last = len(state.transcript) - 1
        if last >= 0 and last not in predicted:
            end = machine.next_start(step, state, more_text=False)
            if end is not None:
                predicted[last] = (end, step)
        machine.process(step, state, dsm.WORD if rng.random() < 0.3 else dsm.PAD)
        step += 1
    ends = [s for _, s in state.transcript[1:]] + [state.end_step]
    assert all(ends[i] == end for i, (end, _) in predicted.items()), (predicted, ends)
    long_words = [i for i, (word, _) in enumerate(state.transcript) if n_tokens[word] > machine.max_padding]
    assert long_words, "no word outlasts the maximum padding: this seed tests nothing"
    for i in long_words:  # known on the step after the word started
        assert predicted[i][1] == state.transcript[i][1] + 1, (i, predicted.get(i), state.transcript[i])
