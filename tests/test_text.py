"""Text front end: normalisation, word chunking of streamed fragments, tokenisation, moshi parity."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kyutai_tts_plugin.errors import CheckpointError
from kyutai_tts_plugin.testing import TEST_VOCAB_SIZE, corpus_sentences, train_test_tokenizer
from kyutai_tts_plugin.text import RawWord, TextTokenizer, WordChunker, normalize_word_text


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_test_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer_spm_test.model")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> TextTokenizer:
    return TextTokenizer.from_file(tokenizer_path)


def chunk(fragments: list[str]) -> list[RawWord]:
    chunker = WordChunker()
    units = [u for f in fragments for u in chunker.push(f)]
    return units + chunker.finish()


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 12)))) if text else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


# -- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("it’s", "it's"),
        ("note:", "note "),
        ("12:30", "12 30"),
        ("(hello)", "hello"),
        ("a\x00b\x07c", "abc"),
        ("zero\u200bwidth\ufeff", "zerowidth"),
        ("tab\tand\nnewline", "tab\tand\nnewline"),  # whitespace is kept: it separates words
        ("déjà vu, ça!", "déjà vu, ça!"),
    ],
)
def test_normalize_word_text(raw: str, expected: str) -> None:
    assert normalize_word_text(raw) == expected


# -- tokenizer ----------------------------------------------------------------------------------


def test_test_tokenizer_is_deterministic_and_has_the_control_ids(tmp_path: Path) -> None:
    a = train_test_tokenizer(tmp_path / "a.model")
    b = train_test_tokenizer(tmp_path / "b.model")
    assert a.read_bytes() == b.read_bytes()
    tok = TextTokenizer.from_file(a)
    assert tok.vocab_size == TEST_VOCAB_SIZE
    sp = tok.processor
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert len(corpus_sentences()) >= 200


def test_encode_word_matches_sentencepiece_on_known_text(tokenizer: TextTokenizer) -> None:
    for word in ["Hello,", "world!", "12.5", "l'homme", "Ça", "quarante-deux.", "\"Don't", "2024-05-17"]:
        ids = tokenizer.encode_word(word)
        assert ids == tokenizer.processor.encode(word)
        assert ids and 0 not in ids


@pytest.mark.parametrize(
    ("word", "same_as"),
    [
        ("héllo😀x", "héllox"),
        ("😀,", ","),
        ("a→b", "ab"),
        ("hi\x07there", "hithere"),
        ("naïve", "nave"),  # ï is not in the test corpus
        ("日本ok", "ok"),
        ("👍🏽👍🏽yes", "yes"),
    ],
)
def test_unknown_characters_are_dropped(tokenizer: TextTokenizer, word: str, same_as: str) -> None:
    assert 0 in tokenizer.processor.encode(word) or "\x07" in word  # the hazard is real
    assert tokenizer.encode_word(word) == tokenizer.processor.encode(same_as)


@pytest.mark.parametrize("word", ["😀", "👍🏽", "\x07", "\u200b", "→←", "日本語", "", "\x00\x01"])
def test_nothing_speakable_gives_no_tokens(tokenizer: TextTokenizer, word: str) -> None:
    assert tokenizer.encode_word(word) == []


def test_random_symbol_soup_never_yields_control_ids(tokenizer: TextTokenizer, test_seed: int) -> None:
    rng = random.Random(test_seed)
    alphabet = (
        "abcdeéèàç,.!?'-0123456789" + "😀🎉→★©™€£¥§¶∞≈√日本中文한국\x00\x07\x1b\u200b\u200d\ufeff\ue000"
    )
    for _ in range(300):
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        ids = tokenizer.encode_word(word)
        assert 0 not in ids, word
        assert all(4 <= i < TEST_VOCAB_SIZE for i in ids), word


def test_tokenizer_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        TextTokenizer.from_file(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match=r"bad\.model: not a valid SentencePiece model"):
        TextTokenizer.from_file(bad)


# -- chunking -----------------------------------------------------------------------------------


def test_chunker_example_from_streamed_fragments() -> None:
    chunker = WordChunker()
    assert chunker.push("Hel") == []
    assert chunker.push("lo wor") == [RawWord("Hello", "Hello")]
    assert chunker.push("ld,\n") == [RawWord("world,", " world,")]
    assert chunker.push("<brea") == []
    assert chunker.push('k time="1s"/> ok') == [RawWord('<break time="1s"/>', '\n<break time="1s"/>', 1.0)]
    assert chunker.push("!") == []
    assert chunker.finish() == [RawWord("ok!", " ok!")]


def test_chunker_breaks_and_lookalikes() -> None:
    units = chunk(['a<break time="2s">b <break time="0.5s" /> x<big> <breakfast c ', " "])
    assert units == [
        RawWord("a", "a"),
        RawWord('<break time="2s">', '<break time="2s">', 2.0),
        RawWord("b", "b"),
        RawWord('<break time="0.5s" />', ' <break time="0.5s" />', 0.5),
        RawWord("x<big>", " x<big>"),
        RawWord("<breakfast", " <breakfast"),
        RawWord("c", " c"),
        RawWord("", "  "),  # trailing whitespace alone: nothing else was left for finish()
    ]
    # Trailing whitespace joins the last unit that finish() returns ("<break " may still become a tag).
    assert chunk(["x <break  "]) == [RawWord("x", "x"), RawWord("<break", " <break  ")]


def test_chunker_incomplete_tag_at_the_end_is_words() -> None:
    assert [u.word for u in chunk(['say <break time="1'])] == ["say", "<break", 'time="1']


def test_chunker_trailing_whitespace_alone() -> None:
    chunker = WordChunker()
    assert chunker.push("done ") == [RawWord("done", "done")]
    assert chunker.push(" \n") == []
    assert chunker.finish() == [RawWord("", "  \n")]
    assert chunker.finish() == []
    assert chunk([]) == []


TEXTS = [
    "Hello, world! This is a test.",
    "  leading and trailing spaces  ",
    'Wait <break time="1.5s"/> then go.<break time="2s">Done',
    "tabs\tnew\nlines\r\n and   runs of   spaces",
    'x<y and a<b>c <break time="3s"/><break time="1s"/>',
    "Unicode: déjà-vu, ça, naïve — 😀 emoji\u00a0nbsp",
    '<break time="0.25s" />',
    "a",
    "",
]


def _reference_words(text: str) -> list[tuple[str, float | None]]:
    units = chunk([text])
    return [(u.word, u.break_s) for u in units if u.word]


@pytest.mark.parametrize("text", TEXTS)
def test_chunker_any_split_gives_the_same_units_and_text(text: str, test_seed: int) -> None:
    expected = _reference_words(text)
    rng = random.Random(f"{test_seed}/{text}")  # a str seed is hashed the same in every process
    for _ in range(200):
        fragments = random_split(text, rng)
        units = chunk(fragments)
        assert "".join(u.text for u in units) == "".join(fragments) == text
        assert [(u.word, u.break_s) for u in units if u.word] == expected
        for u in units:
            assert u.text.endswith(u.word) or u.text.rstrip().endswith(u.word)
            assert u.word == u.word.strip()


def test_chunker_every_single_character_split() -> None:
    for text in TEXTS:
        units = chunk(list(text))
        assert "".join(u.text for u in units) == text
        assert [(u.word, u.break_s) for u in units if u.word] == _reference_words(text)


# -- parity with moshi's script_to_entries ------------------------------------------------------

PARITY_SENTENCES = [
    "Hello, world! This is a test of the streaming text to speech engine.",
    "It’s 7:30 in the morning (and the coffee is ready).",
    "We sold 1,250 tickets in 3 days; that's about 417 per day.",
    'She said: "Don\'t worry, everything will be okay."',
    'Wait <break time="1.5s"/> then go.<break time="2s">Done',
    "Bonjour, comment allez-vous aujourd'hui ? Très bien, merci !",
    "La réunion aura lieu lundi 14 mars à 10 heures : soyez à l'heure.",
    "  Leading, trailing\tand\nnew lines   ",
    "Numbers: 0 1 2 3 4 5 6 7 8 9, prices $19.99 and 19,99 €.",
    "(parenthesised) words:and colons::here",
    '<break time="0.5s"/>Start with a pause<break time="1s"/>',
]


def our_entries(tokenizer: TextTokenizer, text: str, rng: random.Random) -> list[tuple[list[int], str, int]]:
    """What the engine builds from the chunker + normalisation + tokenizer (padding_between = 1),
    the text arriving in random fragments."""
    out = []
    for unit in chunk(random_split(text, rng)):
        if unit.break_s is not None:
            out.append(([], "", int(round(unit.break_s * 12.5))))
            continue
        for piece in normalize_word_text(unit.word).split():
            tokens = tokenizer.encode_word(piece)
            if tokens:
                out.append((tokens, piece, max(0, len(tokens))))
    return out


def test_entries_match_moshi_script_to_entries(tokenizer: TextTokenizer, test_seed: int) -> None:
    from moshi.models.tts import TokenIds, script_to_entries

    rng = random.Random(test_seed)
    token_ids = TokenIds(TEST_VOCAB_SIZE + 1)
    for text in PARITY_SENTENCES:
        ref = script_to_entries(
            tokenizer.processor, token_ids, 12.5, [text], multi_speaker=False, padding_between=1
        )
        expected = [(list(e.tokens), e.text, e.padding) for e in ref]
        assert our_entries(tokenizer, text, rng) == expected, text
        assert all(0 not in tokens for tokens, _, _ in expected)
