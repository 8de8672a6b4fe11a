"""mixture_core.subjects: subject words, weights, MoA Subject Inject's settings and the binding
of subject words to token positions, over a small BPE-like vocabulary (no host)."""

from __future__ import annotations

import re

import pytest

from mixture_core.subjects import (
    SubjectOptions,
    SubjectWord,
    Vocabulary,
    find_subject_tokens,
    parse_subject_words,
    parse_weights,
)

# A CLIP-like vocabulary: "</w>" ends a word; "dancer" + "xyz</w>" is a word of two pieces.
START, END = 100, 101
PIECES = {
    1: "a</w>",
    2: "man</w>",
    3: "and</w>",
    4: "wo",
    5: "super",
    6: "person</w>",
    7: ",</w>",
    8: "dancer",
    9: "xyz</w>",
    10: "talks</w>",
    11: "to</w>",
}
WORDS = {
    "a": [1],
    "man": [2],
    "and": [3],
    "woman": [4, 2],
    "superman": [5, 2],
    "person": [6],
    ",": [7],
    "dancerxyz": [8, 9],
    "talks": [10],
    "to": [11],
    "dog": [12],
}
VOCAB = Vocabulary(lambda w: WORDS.get(w.lower(), []), PIECES, frozenset({START, END}))


def chunks(text: str, length: int = 77) -> list[list[tuple]]:
    """The prompt's token entries (id, weight) in chunks of `length`, with start and end tokens."""
    ids = [i for word in text.replace(",", " ,").split() for i in WORDS[word.lower()]]
    out, inner = [], length - 2
    for k in range(0, max(len(ids), 1), inner):
        out.append([(START, 1.0)] + [(i, 1.0) for i in ids[k : k + inner]] + [(END, 1.0)])
    return out


def positions(text, words, length=77):
    return find_subject_tokens(VOCAB, chunks(text, length), parse_subject_words(words))


def test_subject_words_parse_occurrences():
    assert parse_subject_words("man, woman#2") == [SubjectWord("man", "man", None), SubjectWord("woman#2", "woman", 2)]
    assert parse_subject_words(" red car ") == [SubjectWord("red car", "red car", None)]
    for bad, part in (
        ("  ", "subject_words is empty"),
        ("man,,woman", "an entry is empty"),
        ("man#0", "count from 1"),
        ("#2", "an entry is empty"),
    ):
        with pytest.raises(ValueError, match=part):
            parse_subject_words(bad)


def test_weights():
    assert parse_weights("1, 0.5", 2) == [1.0, 0.5] and parse_weights("0.7", 3) == [0.7] * 3
    assert parse_weights("", 2) == [1.0, 1.0] and parse_weights(0.5, 2) == [0.5, 0.5]
    for bad, part in (
        ("1, 1, 1", "3 weights for 2 subjects"),
        ("-1", "finite and >= 0"),
        ("inf", "finite"),
        ("nan", "finite"),
        ("one", "numbers separated by commas"),
    ):
        with pytest.raises(ValueError, match=part):
            parse_weights(bad, 2)


def test_words_bind_to_their_tokens():
    # <start> a man and a wo+man: "man" is token 2, "woman" ends at 6 (not matched as "man")
    assert positions("a man and a woman", "man, woman") == [2, 6]
    assert positions("a man and a woman", "woman, man") == [6, 2]
    assert positions("a person talks to a person", "person#2, person#1") == [6, 2]
    assert positions("superman and a man", "man") == [5]  # whole words only
    assert positions("a man, a woman", "man") == [2]  # punctuation is its own token
    assert positions("a dancerxyz", "dancerxyz") == [3]  # a word of several pieces binds its last
    assert positions("A MAN", "man") == [2]


def test_embedding_entries_are_not_words():
    """An entry holding an embedding (time lapse, textual inversion) matches no word and
    starts a word after it."""
    tokens = chunks("a man and a man")
    tokens[0][2] = (object(), 1.0)  # the first "man" replaced by an embedding
    assert find_subject_tokens(VOCAB, tokens, parse_subject_words("man")) == [5]


BAD = [
    ("a man", "dog", "'dog' is not a word of the prompt"),
    ("a man talks to a man", "man", "'man' occurs 2 times"),
    ("a man talks to a man", "man#3", "occurrence 3"),
    ("a man and a woman", "man, man#1", "same word of the prompt"),
]


@pytest.mark.parametrize("text,words,part", BAD)
def test_bad_words(text, words, part):
    with pytest.raises(ValueError, match=part):
        positions(text, words)


def test_beyond_the_first_chunk():
    with pytest.raises(ValueError, match="beyond the prompt's first 77 tokens"):
        positions("a a a a man", "man", length=5)  # 3 tokens per chunk: "man" is in the second


OPTION_ERRORS = [
    (dict(strength=1.5), "strength must be in [0, 1]"),
    (dict(start_percent=0.8, end_percent=0.2), "start_percent"),
    (dict(morph=2.0), "morph must be in [0, 1]"),
    (dict(timelapse=0.5), "timelapse_word is empty"),
    (dict(edit_subject=3), "edit_subject 3"),
    (dict(subject_weights="1, 2, 3"), "3 weights for 2 subjects"),
    (dict(text="a man and a dog"), "'woman' is not a word of the prompt"),
]


@pytest.mark.parametrize("kw,part", OPTION_ERRORS)
def test_options_check(kw, part):
    with pytest.raises(ValueError, match=re.escape(part)):
        SubjectOptions("man, woman", **kw).check()


def test_options_check_passes_and_knows_what_it_cannot():
    subjects, weights = SubjectOptions("man, woman", "1, 0.5", text="A  MAN and a woman").check()
    assert [s.word for s in subjects] == ["man", "woman"] and weights == [1.0, 0.5]
    # morph_image not known yet (the schema check before the graph runs): no verdict on it, the rest checked.
    subjects, weights = SubjectOptions("man", morph=0.5).check()
    assert [s.word for s in subjects] == ["man"] and weights == [1.0]
    assert SubjectOptions("man", morph=0.5).check(morph_image_connected=True)[1] == [1.0]
    with pytest.raises(ValueError, match="no morph_image is connected"):
        SubjectOptions("man", morph=0.5).check(morph_image_connected=False)
