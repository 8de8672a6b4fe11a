"""MoA training data: images, captions, and per-subject masks bound to caption words.

Two layouts, told apart by what the folder holds:

* FFHQ-FastComposer: ``image_ids_train.txt`` (one id per line) and per id ``<id>.jpg``,
  ``<id>.json`` (``{"caption": ..., "segments": [{"id": k, "end": char offset where the
  subject's word ends in the caption, "coco_label": "person", ...}]}``) and ``<id>.npy`` (an
  H x W map of segment ids, the image's size);
* a plain folder: ``metadata.jsonl`` with one line per image,
  ``{"file_name": "a.png", "text": "a man and a woman ...", "subjects": [{"word": "man", "mask": "a_man.png"}, ...]}``
  where each mask is a black/white image of the image's size (white = the subject) and a word
  may carry ``#k`` for its k-th occurrence in the caption.

Every file is checked before any model loads; the first bad one stops the run, named.
The subject image each subject's embedding comes from is the subject cut out of the training
image by its mask, on white, as FastComposer does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import DataError, _check_image, load_image

IDS_FILE = "image_ids_train.txt"
METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class Subject:
    word: str  # "man#1": the caption word, with its occurrence
    mask: tuple  # ("npy", path, segment id) or ("png", path)


@dataclass(frozen=True)
class MoASample:
    image: Path
    caption: str
    subjects: tuple[Subject, ...]


def word_at(caption: str, end: int, where) -> str:
    """The word ending at char offset `end`, as 'word#k' (its k-th occurrence)."""
    if not (0 < end <= len(caption)) or not caption[end - 1].isalnum() or (end < len(caption) and caption[end].isalnum()):
        raise DataError(where, f"segment end {end} does not fall at the end of a word of the caption {caption!r}")
    start = end
    while start > 0 and caption[start - 1].isalnum():
        start -= 1
    word = caption[start:end]
    occurrence = sum(1 for m in re.finditer(rf"(?<![0-9A-Za-z]){re.escape(word)}(?![0-9A-Za-z])", caption) if m.start() < start) + 1
    return f"{word}#{occurrence}"


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def _ffhq(root: Path) -> list[MoASample]:
    samples = []
    for number, line in enumerate((root / IDS_FILE).read_text().splitlines(), 1):
        image_id = line.strip()
        if not image_id:
            continue
        image, info, segmap = root / f"{image_id}.jpg", root / f"{image_id}.json", root / f"{image_id}.npy"
        for path in (image, info, segmap):
            if not path.is_file():
                raise DataError(path, f"is missing (listed as id {image_id!r} on line {number} of {root / IDS_FILE})")
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
        subjects = tuple(Subject(word_at(caption, int(s["end"]), info), ("npy", segmap, int(s["id"]))) for s in segments)
        if not subjects:
            raise DataError(info, "has no segments: every training image needs at least one subject")
        samples.append(MoASample(image, caption, subjects))
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
                raise DataError(mask, f"mask size {_image_size(mask)} does not match the image's {_image_size(image)} ({image.name})")
            found.append(Subject(f"{word}#{k or 1}", ("png", mask)))
        samples.append(MoASample(image, caption, tuple(found)))
    return samples


def scan_moa_dataset(root) -> list[MoASample]:
    root = Path(root)
    if (root / IDS_FILE).is_file():
        samples = _ffhq(root)
    elif (root / METADATA).is_file():
        samples = _folder(root)
    else:
        raise DataError(root, f"is not a MoA data folder: it needs {IDS_FILE} (FFHQ-FastComposer layout) or {METADATA} with subjects")
    if not samples:
        raise DataError(root, "holds no training images")
    return samples


def load_mask(source: tuple, resolution: int) -> torch.Tensor:
    """A subject mask cropped and resized like its image: (resolution, resolution) in {0, 1}."""
    from PIL import Image

    if source[0] == "npy":
        ids = np.load(source[1], allow_pickle=False)
        mask = Image.fromarray(((ids == source[2]) * 255).astype(np.uint8))
    else:
        with Image.open(source[1]) as im:
            mask = im.convert("L")
    w, h = mask.size
    scale = resolution / min(w, h)
    mask = mask.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.NEAREST)
    w, h = mask.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    mask = mask.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))


def cut_out(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The subject on white, cropped to its mask's bounding box: (1, h, w, 3), the IMAGE that
    the CLIP image encoder reads."""
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    if len(ys) == 0:
        return torch.ones(1, 8, 8, 3)
    crop = (slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1))
    m = mask[crop][..., None]
    return (image[crop] * m + (1 - m))[None]


class MoADataset(torch.utils.data.Dataset):
    """Indexed by (sample index, stream position), as the other scripts' data (center crops)."""

    def __init__(self, samples: list[MoASample], resolution: int):
        self.samples, self.resolution = samples, resolution

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, position = key
        s = self.samples[index]
        pixels = load_image(s.image, self.resolution)
        masks = torch.stack([load_mask(sub.mask, self.resolution) for sub in s.subjects])
        return {"index": index, "position": position, "pixels": pixels, "caption": s.caption, "masks": masks,
                "words": [sub.word for sub in s.subjects], "subject_images": [cut_out(pixels, m) for m in masks]}


def collate_list(items: list[dict]) -> dict:
    """Samples stay a list (each has its own subjects); index and position as tensors for the noise."""
    return {"items": items, "index": torch.tensor([i["index"] for i in items]), "position": torch.tensor([i["position"] for i in items])}
