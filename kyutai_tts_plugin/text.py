"""The text front end: raw (streamed) text -> words and pauses -> SentencePiece ids.

Splitting and normalisation follow the reference (`moshi.models.tts.script_to_entries`): words are
runs of non-whitespace, punctuation stays attached ("world,"), and an SSML-like
``<break time="1.5s"/>`` tag becomes a pause. The engine turns each word into one DSM entry.
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from .errors import CheckpointError, InvalidInputError

# The longest pause one break tag may ask for. Kyutai's parser has no limit: a single
# `<break time="99999s"/>` streamed 28 hours of silence. Longer is refused (an API should say so rather
# than clamp silently); a longer pause takes several tags, and the server bounds a whole session.
MAX_BREAK_S = 10.0

# `<break time="1.5s"/>` (the slash is optional). moshi writes the decimal point as an unescaped `.`
# (any character); a literal dot is what it means, and float() would fail on anything else. The digits
# are bounded so that a tag still being streamed is re-checked in bounded time (a longer number is text).
_BREAK = re.compile(r'<break\s+time="([0-9]{1,9}(?:\.[0-9]{0,9})?)s"\s*/?>')
# Any *prefix* of a break tag that reaches the end of the buffer: the tag may still be completed by
# the next fragment, so the word before it is not known to be complete yet.
_BREAK_PREFIX = re.compile(
    r'<(?:b(?:r(?:e(?:a(?:k(?:\s+(?:t(?:i(?:m(?:e(?:=(?:"(?:[0-9]{1,9}(?:\.[0-9]{0,9})?'
    r'(?:s(?:"(?:\s*/?)?)?)?)?)?)?)?)?)?)?)?)?)?)?)?)?\Z'
)
_WS_OR_TAG = re.compile(r"\s|<")
_LEADING_WS = re.compile(r"\s*")
_DROPPED_CATEGORIES = {"Cc", "Cf", "Cs"}  # control, format (zero-width, bidi marks), lone surrogates


def normalize_word_text(text: str) -> str:
    """The reference replacements (’ -> ', ':' -> space, no parentheses), minus control characters.

    Whitespace is kept: the result may split into several words (``"a:b"`` -> ``"a b"``).
    """
    text = text.replace("’", "'").replace(":", " ").replace("(", "").replace(")", "")
    return "".join(c for c in text if c.isspace() or unicodedata.category(c) not in _DROPPED_CATEGORIES)


class TextTokenizer:
    """SentencePiece with the one guarantee the DSM model needs: a word never encodes to id 0.

    Ids 0..3 are control tokens for the model (0 = "a new word starts"), and SentencePiece maps any
    character outside its vocabulary to the unknown id 0. Such characters are dropped instead.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, source: str = "<memory>") -> None:
        self.processor = processor
        self.source = source
        # Pieces that carry no sound: unknown, control (<s>, </s>, <pad>), and the bare word-start "▁".
        self._silent = {
            i
            for i in range(processor.get_piece_size())
            if processor.is_unknown(i) or processor.is_control(i) or processor.id_to_piece(i) == "▁"
        }

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found; it comes with the checkpoint.")
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(
                f"{path}: not a valid SentencePiece model ({e}); re-download the checkpoint."
            ) from e
        return cls(processor, str(path))

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    def encode_word(self, word: str) -> list[int]:
        """Token ids of one word (no BOS/EOS). Unrepresentable characters are dropped; [] if nothing
        speakable remains."""
        data = word.encode("utf-8")
        unk = self.processor.unk_id()
        # Each round removes at least one byte, so this ends; usually there is a single round.
        while data:
            pieces = self.processor.encode(data.decode("utf-8", errors="ignore"), return_type="proto").pieces
            # begin/end are byte offsets into the input: cut the bytes that produced unknown pieces.
            bad = [(p.begin, p.end) for p in pieces if p.id == unk or self.processor.is_unknown(p.id)]
            if not bad:
                ids = [p.id for p in pieces if not self.processor.is_control(p.id)]
                return ids if any(i not in self._silent for i in ids) else []
            kept, last = [], 0
            for begin, end in bad:
                kept.append(data[last:begin])
                last = max(last, end)
            kept.append(data[last:])
            shorter = b"".join(kept)
            if len(shorter) >= len(data):  # an unknown piece with an empty surface: give up on the word
                return []
            data = shorter
        return []


@dataclass(frozen=True)
class RawWord:
    """One unit of the input: a word, a pause, or (at the very end) bare whitespace.

    ``text`` is the exact slice of the input this unit accounts for, including the whitespace before
    it, so joining ``text`` over all units gives back the input. ``break_s`` is set for a break tag,
    whose tag is then ``word``.
    """

    word: str
    text: str
    break_s: float | None = None


class WordChunker:
    """Cuts streamed text fragments (split anywhere) into complete words and break tags.

    A word is complete when whitespace or a complete break tag follows it, or at ``finish()``. Work is
    linear in the text, however it is split: a word streamed one character at a time is scanned once.

    A break tag longer than `MAX_BREAK_S` raises `InvalidInputError` from the ``push`` or ``finish``
    that completes it; the tag is dropped, and the units completed before it come with the next call.
    """

    def __init__(self) -> None:
        self._buffer = ""
        # Where the search for the end of the buffer's first word resumes: the text before it is known to
        # hold no word end. Without it, each push re-scanned the whole pending word (quadratic time).
        self._scan_from = 0
        self._done: list[RawWord] = []  # units completed but not yet returned (a refused tag came after)

    def push(self, fragment: str) -> list[RawWord]:
        """Add text; return the units this fragment completed."""
        self._buffer += fragment
        self._take(final=False)
        units, self._done = self._done, []
        return units

    def finish(self) -> list[RawWord]:
        """The input is complete: return every remaining unit (trailing whitespace included)."""
        self._take(final=True)
        units, self._done = self._done, []
        rest, self._buffer = self._buffer, ""
        if rest:  # only whitespace is left
            if units:
                last = units[-1]
                units[-1] = RawWord(last.word, last.text + rest, last.break_s)
            else:
                units.append(RawWord("", rest, None))
        return units

    def _take(self, final: bool) -> None:
        units = self._done
        buf, pos = self._buffer, 0  # `pos`: start of the text not yet returned (no re-slicing per word)
        scan_from = self._scan_from
        try:
            while True:
                start = _LEADING_WS.match(buf, pos).end()  # type: ignore[union-attr]
                if start == len(buf):
                    break
                tag = _BREAK.match(buf, start)
                if tag is not None:
                    seconds = float(tag.group(1))
                    text, pos, scan_from = buf[pos : tag.end()], tag.end(), 0
                    if seconds > MAX_BREAK_S:
                        raise InvalidInputError(
                            f"break time={tag.group(1)}s is too long: a break is at most {MAX_BREAK_S:g} s "
                            "(the tag was dropped)"
                        )
                    units.append(RawWord(tag.group(0), text, seconds))
                    continue
                end, scan_from = self._word_end(buf, max(start, scan_from), final)
                if end is None:
                    break
                units.append(RawWord(buf[start:end], buf[pos:end], None))
                pos, scan_from = end, 0
        finally:
            self._buffer = buf[pos:]
            self._scan_from = max(0, scan_from - pos)

    @staticmethod
    def _word_end(buf: str, pos: int, final: bool) -> tuple[int | None, int]:
        """Where the word being scanned from `pos` ends, or None if the next fragment could extend it;
        and where a later scan of the same word must resume."""
        while True:
            m = _WS_OR_TAG.search(buf, pos)
            if m is None:
                return (len(buf) if final else None), len(buf)
            at = m.start()
            if buf[at] != "<" or _BREAK.match(buf, at):
                return at, at
            if not final and _BREAK_PREFIX.match(buf, at):
                return None, at  # "<bre" at the end: maybe a tag, maybe part of the word
            pos = at + 1
