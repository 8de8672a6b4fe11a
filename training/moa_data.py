"""MoA training data: the folder scan (images, captions, and per-subject masks bound to caption
words), checked before any model loads.

Layouts, told apart by what the folder holds:

* FastComposer's FFHQ-wild (github mit-han-lab/fastcomposer ``fastcomposer/data.py``, the data
  MoA trains on, MoA paper Sec. 4.1): an ids file ``image_ids_train.txt`` (or ``image_ids.txt``),
  one id per line, and per id ``<id>.jpg``, ``<id>.json`` (``{"caption": ..., "segments": [{"id": k,
  "end": char offset where the subject's word ends, "coco_label": "person", ...}]}``) and
  ``<id>.npy`` (an H x W map of segment ids), nested by id prefix as the download unpacks,
  ``<root>/<id[:5]>/<id>.*`` (FastComposer's ``chunk = image_id[:5]``), or flat ``<root>/<id>.*``;
* a plain folder: ``metadata.jsonl`` with one line per image,
  ``{"file_name": "a.png", "text": "a man and a woman ...", "subjects": [{"word": "man", "mask": "a_man.png"}, ...]}``
  where each mask is a black/white image of the image's size (white = the subject) and a word
  may carry ``#k`` for its k-th occurrence in the caption.

Only segments of the kept object types are subjects (FastComposer's ``--object_types person``);
what a training item draws from a sample (subject choice, drops, subject images) is
training.moa_samples.

Every file is checked before any model loads; the first bad one stops the run, named.
``python -m training.moa_data --data DIR`` checks a folder and prints what training will see.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import DataError, _check_image

IDS_FILES = ("image_ids_train.txt", "image_ids.txt")  # FastComposer's split="train", then split="all"
METADATA = "metadata.jsonl"
OBJECT_TYPES = ("person",)


@dataclass(frozen=True)
class Subject:
    word: str  # "man#1": the caption word, with its occurrence
    mask: tuple  # ("npy", path, segment id) or ("png", path)


@dataclass(frozen=True)
class MoASample:
    image: Path
    caption: str
    subjects: tuple[Subject, ...]


@dataclass
class ScanReport:
    """What a scan kept and left out, for the log and the data check."""

    images: int = 0
    skipped_no_subject: list = field(default_factory=list)  # image files without a kept subject
    labels_kept: Counter = field(default_factory=Counter)
    labels_left: Counter = field(default_factory=Counter)
    subjects_per_image: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [
            f"{self.images} training images; subjects per image: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(self.subjects_per_image.items()))
        ]
        if self.labels_kept or self.labels_left:
            out.append(
                f"segments kept: {dict(self.labels_kept)}; left out (other object types): {dict(self.labels_left)}"
            )
        if self.skipped_no_subject:
            out.append(
                f"{len(self.skipped_no_subject)} images hold no subject of the kept types and are left out, "
                f"such as {self.skipped_no_subject[0]}"
            )
        return out


def word_at(caption: str, end: int, where) -> str:
    """The word ending at char offset `end`, as 'word#k' (its k-th occurrence)."""
    if (
        not (0 < end <= len(caption))
        or not caption[end - 1].isalnum()
        or (end < len(caption) and caption[end].isalnum())
    ):
        raise DataError(where, f"segment end {end} does not fall at the end of a word of the caption {caption!r}")
    start = end
    while start > 0 and caption[start - 1].isalnum():
        start -= 1
    word = caption[start:end]
    occurrence = (
        sum(1 for m in re.finditer(rf"(?<![0-9A-Za-z]){re.escape(word)}(?![0-9A-Za-z])", caption) if m.start() < start)
        + 1
    )
    return f"{word}#{occurrence}"


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def _id_files(root: Path, image_id: str) -> tuple[Path, Path, Path]:
    """FastComposer's nested <root>/<id[:5]>/<id>.* when that folder exists, else flat <root>/<id>.*."""
    folder = root / image_id[:5]
    if not folder.is_dir():
        folder = root
    return folder / f"{image_id}.jpg", folder / f"{image_id}.json", folder / f"{image_id}.npy"


def _ffhq(root: Path, ids_file: Path, object_types, report: ScanReport) -> list[MoASample]:
    samples = []
    for number, line in enumerate(ids_file.read_text().splitlines(), 1):
        image_id = line.strip()
        if not image_id:
            continue
        image, info, segmap = _id_files(root, image_id)
        for path in (image, info, segmap):
            if not path.is_file():
                raise DataError(path, f"is missing (listed as id {image_id!r} on line {number} of {ids_file})")
        _check_image(image)
        try:
            meta = json.loads(info.read_text())
            caption, segments = meta["caption"], meta["segments"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(info, f"is not a FastComposer caption file (needs 'caption' and 'segments': {e})") from None
        try:
            ids = np.load(segmap, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(segmap, f"is not a segment map (.npy without pickles): {e}") from None
        if tuple(ids.shape[:2]) != _image_size(image):
            raise DataError(segmap, f"mask size {tuple(ids.shape[:2])} does not match the image's {_image_size(image)}")
        subjects = []
        for k, s in enumerate(segments):
            label = s.get("coco_label")
            if object_types is not None:
                if label is None:
                    raise DataError(
                        info,
                        f"segment {k} has no coco_label to select object types by "
                        "(train on every segment with --object-types all)",
                    )
                if label not in object_types:
                    report.labels_left[label] += 1
                    continue
            report.labels_kept[label] += 1
            subjects.append(Subject(word_at(caption, int(s["end"]), info), ("npy", segmap, int(s["id"]))))
        if not subjects:
            report.skipped_no_subject.append(str(image))
            continue
        samples.append(MoASample(image, caption, tuple(subjects)))
    return samples


def _folder(root: Path) -> list[MoASample]:
    samples = []
    meta = root / METADATA
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{meta}, line {number}"
        try:
            entry = json.loads(line)
            image, caption, subjects = root / entry["file_name"], entry["text"], entry["subjects"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(where, f"needs file_name, text and subjects ({e})") from None
        if not image.is_file():
            raise DataError(image, f"is missing (named on {where})")
        _check_image(image)
        if not subjects:
            raise DataError(where, "lists no subjects: every training image needs at least one")
        found = []
        for s in subjects:
            word, _, k = s["word"].partition("#")
            if not re.search(rf"(?<![0-9A-Za-z]){re.escape(word)}(?![0-9A-Za-z])", caption):
                raise DataError(where, f"subject word {word!r} is not a word of the caption {caption!r}")
            mask = root / s["mask"]
            if not mask.is_file():
                raise DataError(mask, f"is missing (mask of {word!r} on {where})")
            _check_image(mask)
            if _image_size(mask) != _image_size(image):
                raise DataError(
                    mask,
                    f"mask size {_image_size(mask)} does not match the image's {_image_size(image)} ({image.name})",
                )
            found.append(Subject(f"{word}#{k or 1}", ("png", mask)))
        samples.append(MoASample(image, caption, tuple(found)))
    return samples


def parse_object_types(spec: str | None):
    """'person,dog' -> ('person', 'dog'); 'all' -> None (every segment is a subject)."""
    if spec is None or spec.strip().lower() == "all":
        return None
    types = tuple(t.strip() for t in spec.split(",") if t.strip())
    if not types:
        raise ValueError("--object-types needs at least one COCO label (such as person) or 'all'")
    return types


def scan_moa_dataset(root, object_types=OBJECT_TYPES, report: ScanReport | None = None) -> list[MoASample]:
    """The training samples of a MoA data folder (FFHQ-FastComposer layout: only segments whose
    coco_label is in object_types, None for all). Raises DataError on the first bad file."""
    root = Path(root)
    report = report if report is not None else ScanReport()
    if not root.is_dir():
        raise DataError(root, "is not a folder")
    ids_file = next((root / name for name in IDS_FILES if (root / name).is_file()), None)
    if ids_file is not None:
        samples = _ffhq(root, ids_file, object_types, report)
    elif (root / METADATA).is_file():
        samples = _folder(root)
    else:
        raise DataError(
            root,
            f"is not a MoA data folder: it needs {' or '.join(IDS_FILES)} (FastComposer's FFHQ-wild "
            f"layout) or {METADATA} with subjects",
        )
    if not samples:
        why = (
            f" ({len(report.skipped_no_subject)} images hold no segment of the types {object_types})"
            if report.skipped_no_subject
            else ""
        )
        raise DataError(root, f"holds no training images{why}")
    report.images = len(samples)
    report.subjects_per_image.update(len(s.subjects) for s in samples)
    return samples


def main(argv=None) -> int:
    """Check a MoA data folder before training and say what the trainer will see."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--data", required=True, help="the folder --data of training.moa_train will read")
    p.add_argument(
        "--object-types", default=",".join(OBJECT_TYPES), help="COCO labels kept as subjects, or 'all' (default person)"
    )
    args = p.parse_args(argv)
    report = ScanReport()
    try:
        scan_moa_dataset(args.data, parse_object_types(args.object_types), report)
    except (DataError, ValueError) as e:
        print(f"error: bad training data: {e}")
        return 1
    print("\n".join(report.lines()))
    print("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
