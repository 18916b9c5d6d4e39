"""The text front end under hostile input: bounded pauses, and linear work however text is split."""

from __future__ import annotations

import re
from typing import Any

import pytest

from kyutai_tts_plugin import text as text_module
from kyutai_tts_plugin.errors import InvalidInputError
from kyutai_tts_plugin.text import MAX_BREAK_S, RawWord, WordChunker
from kyutai_tts_plugin.types import AudioChunk, SessionOptions


def chunk_all(pieces: list[str]) -> list[RawWord]:
    chunker = WordChunker()
    units = [u for piece in pieces for u in chunker.push(piece)]
    return units + chunker.finish()


def test_break_over_the_cap_is_refused_and_dropped() -> None:
    chunker = WordChunker()
    with pytest.raises(InvalidInputError, match=r"break time=99999s is too long: a break is at most 10 s"):
        chunker.push('hello <break time="99999s"/> world')
    # the word before the tag still comes out, the tag does not, and the text after it goes on
    units = chunker.push(" again") + chunker.finish()
    assert [(u.word, u.break_s) for u in units] == [("hello", None), ("world", None), ("again", None)]


def test_break_at_the_cap_is_a_pause() -> None:
    units = chunk_all([f'a <break time="{MAX_BREAK_S:g}s"/> b'])
    assert [u.break_s for u in units] == [None, MAX_BREAK_S, None]
    with pytest.raises(InvalidInputError):
        chunk_all(['a <break time="10.001s"/> b'])


def test_refused_break_split_over_fragments() -> None:
    chunker = WordChunker()
    assert [u.word for u in chunker.push("one <break ")] == ["one"]
    for piece in ('time="3', '600s"'):
        assert chunker.push(piece) == []
    with pytest.raises(InvalidInputError, match="3600s"):
        chunker.push("/>")
    assert [u.word for u in chunker.push("two") + chunker.finish()] == ["two"]


def test_engine_refuses_a_long_break_and_keeps_the_session(tiny_engine: Any) -> None:
    session = tiny_engine.open_session(SessionOptions(temperature=0.0, n_q=4))
    session.push_text("hello ")
    with pytest.raises(InvalidInputError, match="break"):
        session.push_text('<break time="99999s"/>')
    session.push_text(" world")
    session.flush()
    frames = sum(isinstance(ev, AudioChunk) for ev in session)
    assert session.words == ["hello", "world"]
    assert 0 < frames < 100  # a few seconds, not 28 hours of silence


class CountingPattern:
    """Wraps a compiled pattern; adds up how many characters its searches could examine."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.examined = 0
        self.calls = 0

    def search(self, string: str, pos: int = 0) -> re.Match[str] | None:
        self.calls += 1
        m = self.pattern.search(string, pos)
        self.examined += (m.end() if m else len(string)) - pos
        return m

    def match(self, string: str, pos: int = 0) -> re.Match[str] | None:
        self.calls += 1
        return self.pattern.match(string, pos)


@pytest.mark.parametrize(
    "word",
    ["x" * 4000, "a<b" * 1300, "<bre" * 1000, '<break time="' + "1" * 4000],
    ids=["letters", "angle-brackets", "tag-lookalikes", "unfinished-tag"],
)
def test_a_word_pushed_one_character_at_a_time_costs_linear_work(
    word: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    search = CountingPattern(text_module._WS_OR_TAG)
    monkeypatch.setattr(text_module, "_WS_OR_TAG", search)
    chunker = WordChunker()
    units = [u for c in word for u in chunker.push(c)]
    units += chunker.push(" end") + chunker.finish()
    assert "".join(u.text for u in units) == word + " end"
    # Re-scanning the pending word on every push examined about len(word)**2 / 2 characters (8 million).
    assert search.examined <= 3 * len(word) + 100
    assert search.calls <= 3 * len(word) + 100


def test_any_split_still_gives_the_same_units() -> None:
    text = 'Hi <break time="1.5s"/>there a<b  <bre <break time="2s"> x<break time="1s"/>y  '
    whole = chunk_all([text])
    for size in (1, 2, 3, 5, 7):
        assert chunk_all([text[i : i + size] for i in range(0, len(text), size)]) == whole
