"""MoA training data: images, captions, and per-subject masks bound to caption words.

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

As FastComposer trains (``scripts/run_training.sh``): only segments of the kept object types
are subjects (``--object_types person``), at most 4 per image (``--max_num_objects 4``, a random
4 of more), each dropped with probability 0.1 (``--object_appear_prob 0.9``) and the whole
condition (caption and subjects) with probability 0.1 (``--uncondition_prob 0.1``; MoA paper
Tab. 1 "Prob. of removing condition 0.1"). A dropped subject keeps its word in the caption as
plain text: only the kept subjects are bound.

Subject images are made as FastComposer makes them (mixture_core.subject_images): the segment
of the full, uncropped image on a random-noise background, cropped to its box, (training only:
its augmentations) padded to a square, resized to 224.

Every file is checked before any model loads; the first bad one stops the run, named.
``python -m training.moa_data --data DIR`` checks a folder and prints what training will see.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mixture_core.subject_images import SUBJECT_SIZE, cut_out, noise_background, pad_to_square, resize_square

from .data import DataError, _check_image, load_image

IDS_FILES = ("image_ids_train.txt", "image_ids.txt")  # FastComposer's split="train", then split="all"
METADATA = "metadata.jsonl"
OBJECT_TYPES = ("person",)
MAX_SUBJECTS = 4
SUBJECT_DROP = 0.1
CONDITION_DROP = 0.1


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


# ---- reading one sample ----------------------------------------------------------------------


def read_mask(source: tuple) -> torch.Tensor:
    """A subject's full-size mask, (H, W) bool."""
    from PIL import Image

    if source[0] == "npy":
        return torch.from_numpy(np.load(source[1], allow_pickle=False) == source[2])
    with Image.open(source[1]) as im:
        return torch.from_numpy(np.asarray(im.convert("L")) > 127)


def crop_mask(mask: torch.Tensor, resolution: int) -> torch.Tensor:
    """A full-size mask resized and center-cropped like its image (training.data.load_image):
    (resolution, resolution) in {0, 1}."""
    from PIL import Image

    im = Image.fromarray(mask.numpy().astype(np.uint8) * 255)
    w, h = im.size
    scale = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.NEAREST)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy((np.asarray(im) > 127).astype(np.float32))


def read_full_image(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)


class ZoomIn(torch.nn.Module):
    """FastComposer's RandomZoomIn(1.0, 2.0): enlarge by a random factor, then keep the top
    square of a tall result (its CropTopSquare: the head stays in)."""

    def __init__(self, min_zoom: float = 1.0, max_zoom: float = 2.0):
        super().__init__()
        self.min_zoom, self.max_zoom = min_zoom, max_zoom

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # (C, H, W)
        from torchvision.transforms import v2

        zoom = float(torch.rand(1)) * (self.max_zoom - self.min_zoom) + self.min_zoom
        image = v2.functional.resize(image, [int(zoom * image.shape[1]), int(zoom * image.shape[2])], antialias=True)
        return image[:, : image.shape[2]] if image.shape[1] > image.shape[2] else image


def subject_augmentations():
    """FastComposer's get_object_transforms (not --no_object_augmentation), with torchvision:
    (before padding) zoom-in p 0.5; (after resizing) rotation up to 30 degrees p 0.75, colour
    jitter 0.5 p 0.5, blur p 0.5, grayscale p 0.1, flip p 0.5, elastic p 0.5."""
    from torchvision.transforms import v2

    before = v2.RandomApply([ZoomIn(1.0, 2.0)], p=0.5)
    after = v2.Compose(
        [
            v2.RandomApply([v2.RandomAffine(degrees=30, interpolation=v2.InterpolationMode.BILINEAR)], p=0.75),
            v2.RandomApply([v2.ColorJitter(0.5, 0.5, 0.5, 0.5)], p=0.5),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 2.0))], p=0.5),
            v2.RandomGrayscale(p=0.1),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ElasticTransform()], p=0.5),
        ]
    )
    return before, after


def make_subject_image(
    image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator, augment=None
) -> torch.Tensor:
    """(H, W, 3) image and (H, W) mask of the full photo -> (224, 224, 3): the subject on noise,
    box-cropped, (augmented), padded to a square, resized (FastComposer's order)."""
    crop = cut_out(image, mask, noise_background(image.shape, generator))
    if augment is None:
        return resize_square(pad_to_square(crop), SUBJECT_SIZE)
    before, after = augment
    chw = before(crop.movedim(-1, 0).contiguous())
    chw = resize_square(pad_to_square(chw.movedim(0, -1)), SUBJECT_SIZE).movedim(-1, 0)
    return after(chw.clamp(0, 1)).clamp(0, 1).movedim(0, -1).contiguous()


@dataclass(frozen=True)
class Draws:
    """Per-sample random choices of FastComposer's data (see the module doc)."""

    object_types: tuple | None = OBJECT_TYPES
    max_subjects: int = MAX_SUBJECTS
    subject_drop: float = SUBJECT_DROP
    condition_drop: float = CONDITION_DROP
    augment: bool = True


class MoADataset(torch.utils.data.Dataset):
    """Indexed by (sample index, stream position); the position seeds every random choice
    (drops, subject choice, noise backgrounds, augmentations), so a resumed run reads exactly
    what an uninterrupted one would.

    An item: pixels (res, res, 3); caption ("" when the condition is dropped); words and masks
    (n, res, res) of the bound subjects; foreground (res, res): the bound subjects' union, or,
    with the condition dropped, every subject's (else those samples would teach nothing);
    subject_images (n, 224, 224, 3)."""

    def __init__(self, samples: list[MoASample], resolution: int, draws: Draws = Draws(), seed: int = 0):
        self.samples, self.resolution, self.draws, self.seed = samples, resolution, draws, seed
        self.augment = subject_augmentations() if draws.augment else None

    def __len__(self):
        return len(self.samples)

    def choose(self, index: int, rng: random.Random) -> tuple[bool, list[Subject]]:
        """(condition dropped, bound subjects in caption order)."""
        subjects = list(self.samples[index].subjects)
        if rng.random() < self.draws.condition_drop:
            return True, []
        kept = [s for s in subjects if rng.random() >= self.draws.subject_drop]
        if len(kept) > self.draws.max_subjects:
            chosen = set(rng.sample(range(len(kept)), self.draws.max_subjects))
            kept = [s for i, s in enumerate(kept) if i in chosen]
        return False, kept

    def __getitem__(self, key):
        index, position = key if isinstance(key, tuple) else (key, 0)
        rng = random.Random(self.seed * 1_000_003 + position * 8191 + index)
        s = self.samples[index]
        dropped, bound = self.choose(index, rng)
        full_masks = {sub: read_mask(sub.mask) for sub in (s.subjects if dropped else bound)}
        masks = {sub: crop_mask(m, self.resolution) for sub, m in full_masks.items()}
        empty = torch.zeros(self.resolution, self.resolution)
        foreground = torch.stack(list(masks.values())).amax(0) if masks else empty
        subject_images = torch.zeros(0, SUBJECT_SIZE, SUBJECT_SIZE, 3)
        if bound:
            full = read_full_image(s.image)
            g = torch.Generator().manual_seed(rng.randrange(2**63))
            with torch.random.fork_rng(devices=[]):  # torchvision's random transforms draw from the global generator
                torch.manual_seed(rng.randrange(2**63))
                subject_images = torch.stack(
                    [make_subject_image(full, full_masks[sub], g, self.augment) for sub in bound]
                )
        return {
            "index": index,
            "position": position,
            "pixels": load_image(s.image, self.resolution),
            "caption": "" if dropped else s.caption,
            "words": [sub.word for sub in bound],
            "masks": torch.stack([masks[sub] for sub in bound]) if bound else empty[None][:0],
            "foreground": foreground,
            "subject_images": subject_images,
        }


def collate_list(items: list[dict]) -> dict:
    """Samples stay a list (each has its own subjects); index and position as tensors for the noise."""
    return {
        "items": items,
        "index": torch.tensor([i["index"] for i in items]),
        "position": torch.tensor([i["position"] for i in items]),
    }


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
