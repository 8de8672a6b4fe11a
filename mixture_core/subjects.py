"""MoA Subject Inject's inputs, host-free: the subject words (``man, woman#2``), their
weights, the range checks of the node's numbers, and the binding of each subject word to its
token over the prompt's token ids.

The tokenizer itself stays in the host adapter; here it is seen through a ``Vocabulary``:
the ids of a word, the text of an id (CLIP BPE marks a word's last piece with ``</w>``), and
the start/end ids. Every function raises a ValueError naming the input and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

_SUBJECT = re.compile(r"^(?P<word>.*?)(?:#(?P<occurrence>\d+))?$")


@dataclass(frozen=True)
class SubjectWord:
    text: str  # as the user wrote it, for messages: "person#2"
    word: str  # "person"
    occurrence: int | None  # 2, or None: the word must occur once


def parse_subject_words(spec: str) -> list[SubjectWord]:
    """ "man, woman#2" -> subjects in order. Each entry is a word (or a phrase) of the prompt,
    optionally with #k to pick its k-th occurrence."""
    if not spec.strip():
        raise ValueError("subject_words is empty: name the prompt's word of each subject, such as 'man, woman'")
    subjects = []
    for raw in spec.split(","):
        entry = raw.strip()
        m = _SUBJECT.match(entry)
        word = m["word"].strip()
        if not word:
            raise ValueError(
                f"subject_words {spec!r}: an entry is empty; separate the subject words with commas, "
                "such as 'man, woman'"
            )
        occurrence = int(m["occurrence"]) if m["occurrence"] is not None else None
        if occurrence is not None and occurrence < 1:
            raise ValueError(f"subject_words: {entry!r}: occurrences count from 1 ({word}#1 is the first)")
        subjects.append(SubjectWord(entry, word, occurrence))
    return subjects


def parse_weights(spec, count: int) -> list[float]:
    """ "1.0, 0.8" -> one weight per subject; one number applies to all; empty: all 1."""
    if isinstance(spec, (int, float)):
        values = [float(spec)]
    elif not str(spec).strip():
        values = [1.0]
    else:
        try:
            values = [float(x) for x in str(spec).split(",")]
        except ValueError:
            raise ValueError(
                f"subject_weights {spec!r}: give numbers separated by commas, such as '1.0, 0.8'"
            ) from None
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise ValueError(
            f"subject_weights {spec!r} gives {len(values)} weights for {count} subjects; give one per "
            "subject or a single one for all"
        )
    if any(not (v >= 0.0) or v == float("inf") for v in values):
        raise ValueError(
            f"subject_weights {spec!r}: weights must be finite and >= 0 (0 = plain text token, 1 = fully fused)"
        )
    return values


def _words(text: str) -> str:
    # CLIP's tokenizer lower-cases and collapses white space before it splits.
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class SubjectOptions:
    """MoA Subject Inject's settings (everything but the models and images). ``check`` runs
    every check that needs no tokenizer nor image: the node's validate_inputs runs it before
    the queue starts, and the node again on the values it is given."""

    subject_words: str
    subject_weights: str | float = "1.0"
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    edit_subject: int = 1
    morph: float = 0.0
    timelapse_word: str = ""
    timelapse: float = 0.0
    text: str | None = None  # None: not known yet (wired from another node)

    def check(self, morph_image_connected: bool | None = None) -> tuple[list[SubjectWord], list[float]]:
        """(subjects, one weight per subject). morph_image_connected None: not known yet."""
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], not {self.strength}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(
                f"start_percent ({self.start_percent}) and end_percent ({self.end_percent}) must satisfy "
                "0 <= start <= end <= 1"
            )
        for name in ("morph", "timelapse"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")
        subjects = parse_subject_words(self.subject_words)
        weights = parse_weights(self.subject_weights, len(subjects))
        if not 1 <= self.edit_subject <= len(subjects):
            raise ValueError(
                f"edit_subject {self.edit_subject}: there are {len(subjects)} subjects (1..{len(subjects)})"
            )
        if self.morph > 0 and morph_image_connected is False:
            raise ValueError(f"morph is {self.morph} but no morph_image is connected")
        if self.timelapse > 0 and not self.timelapse_word.strip():
            raise ValueError(
                f"timelapse is {self.timelapse} but timelapse_word is empty; name the word to move towards "
                "(such as 'kid')"
            )
        if self.text is not None:
            # A word absent from the text is absent from its tokens: said here, before any model runs.
            # (Present in the text is not enough: the token match below decides whole words.)
            for s in subjects:
                if _words(s.word) not in _words(self.text):
                    raise ValueError(
                        f"subject_words: {s.word!r} is not a word of the prompt; each subject word must "
                        "appear in the prompt"
                    )
        return subjects, weights


@dataclass(frozen=True)
class Vocabulary:
    """What subject binding needs of a BPE tokenizer (CLIP's)."""

    word_ids: Callable[[str], list[int]]  # the ids of a word, without start/end tokens
    id_text: Mapping[int, str]  # id -> its BPE text; a word's last piece ends with "</w>"
    specials: frozenset  # the start and end ids


def _is_id(t) -> bool:
    # Token entries may hold an embedding tensor instead of an id (time lapse, textual inversion).
    return isinstance(t, int) and not isinstance(t, bool)


def find_subject_tokens(vocab: Vocabulary, chunks: Sequence[Sequence[tuple]], subjects: list[SubjectWord]) -> list[int]:
    """The position in the first 77-token chunk of each subject's word, chunks being the
    tokenizer's output ((id, weight, ...) entries per chunk): the word's last token for a
    word CLIP splits into several. A word is matched whole (a token sequence starting at a
    word start and ending at a word end: 'man' matches neither 'woman' nor 'superman')."""

    def starts_word(chunk, i):
        if i == 0:
            return True
        prev = chunk[i - 1][0]
        return not _is_id(prev) or prev in vocab.specials or vocab.id_text.get(prev, "").endswith("</w>")

    positions = []
    for subject in subjects:
        ids = vocab.word_ids(subject.word)
        if not ids:
            raise ValueError(f"subject_words: {subject.text!r} has no CLIP tokens")
        found = []  # (chunk, position of the last token)
        for c, chunk in enumerate(chunks):
            tokens = [entry[0] for entry in chunk]
            for i in range(len(tokens) - len(ids) + 1):
                if all(_is_id(tokens[i + j]) and tokens[i + j] == ids[j] for j in range(len(ids))) and starts_word(
                    chunk, i
                ):
                    found.append((c, i + len(ids) - 1))
        if not found:
            raise ValueError(
                f"subject_words: {subject.word!r} is not a word of the prompt; each subject word must "
                "appear in the prompt"
            )
        if subject.occurrence is None:
            if len(found) > 1:
                raise ValueError(
                    f"subject_words: {subject.word!r} occurs {len(found)} times in the prompt; say which "
                    f"one with an occurrence index, such as '{subject.word}#1' or '{subject.word}#2'"
                )
            chunk, position = found[0]
        else:
            if subject.occurrence > len(found):
                raise ValueError(
                    f"subject_words: {subject.text!r} asks for occurrence {subject.occurrence}, but "
                    f"{subject.word!r} occurs {len(found)} time(s) in the prompt"
                )
            chunk, position = found[subject.occurrence - 1]
        if chunk > 0:
            raise ValueError(
                f"subject_words: {subject.text!r} is beyond the prompt's first 77 tokens; MoA binds "
                "subjects in the first 77-token chunk only: move the subject earlier or shorten the prompt"
            )
        positions.append(position)
    for i, a in enumerate(positions):
        for j in range(i):
            if positions[j] == a:
                raise ValueError(
                    f"subject_words: {subjects[j].text!r} and {subjects[i].text!r} are the same word of "
                    "the prompt; bind each subject to its own word"
                )
    return positions
