"""Training data: an image folder with captions, read the way kohya's scripts and
diffusers' `imagefolder` read them.

* ``<folder>/metadata.jsonl``: one JSON object per line, ``{"file_name": "a.png", "text": "..."}``
  (file names relative to the folder, subfolders allowed); or
* ``<folder>/meta_cap.json``: kohya's fine-tuning metadata, ``{"<image key>": {"caption": "...",
  "tags": "..."}}`` with the image key the image's path without extension (relative to the folder,
  or absolute), as kohya's merge_captions_to_metadata.py writes it; or, without either,
* every image in the folder (recursively) with a same-name ``.txt`` caption beside it
  (``a.png`` + ``a.txt``).

Nothing is skipped silently: a missing caption, a metadata line without a file, an image that
cannot be decoded stop the run with a ``DataError`` naming the first bad file. Images are
resized so that the shorter side equals the resolution, then cropped to a square (center crop,
or a random crop seeded by the run's seed and the sample's position in the stream).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"
KOHYA_METADATA = "meta_cap.json"


class DataError(ValueError):
    """A training data problem, with the file it is about."""

    def __init__(self, path, message: str):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


@dataclass(frozen=True)
class Sample:
    image: Path
    caption: str


def _check_image(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # header and structure; a full decode happens when the image is read
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise DataError(path, f"is not a readable image ({type(e).__name__}: {e})") from e


def _from_metadata(root: Path) -> list[Sample]:
    meta = root / METADATA
    samples = []
    with open(meta, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{meta}, line {number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(where, f"is not JSON ({e})") from e
            if not isinstance(entry, dict) or "file_name" not in entry or "text" not in entry:
                raise DataError(
                    where,
                    'needs both "file_name" and "text" (for example {"file_name": "a.png", "text": "a photo of a face"})',
                )
            if not isinstance(entry["text"], str):
                raise DataError(where, f'"text" must be a string, not {type(entry["text"]).__name__}')
            image = root / entry["file_name"]
            if not image.is_file():
                raise DataError(image, f"is named in {where} but does not exist")
            samples.append(Sample(image, entry["text"].strip()))
    return samples


def _kohya_image(root: Path, key: str) -> Path | None:
    path = Path(key) if Path(key).is_absolute() else root / key
    if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
        return path
    for ext in IMAGE_EXTENSIONS:
        for candidate in (path.with_name(path.name + ext), path.with_name(path.name + ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def _from_kohya_metadata(root: Path) -> list[Sample]:
    meta = root / KOHYA_METADATA
    try:
        entries = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(meta, f"is not JSON ({e})") from e
    if not isinstance(entries, dict):
        raise DataError(meta, 'must map image keys to {"caption": ...} (kohya\'s meta_cap.json layout)')
    samples = []
    for key, entry in entries.items():
        where = f"{meta}, entry {key!r}"
        caption = entry.get("caption") if isinstance(entry, dict) else None
        if caption is None and isinstance(entry, dict):
            caption = entry.get("tags")  # kohya's tag-only metadata
        if not isinstance(caption, str):
            raise DataError(where, 'needs a "caption" (or "tags") string')
        image = _kohya_image(root, key)
        if image is None:
            raise DataError(where, f"names no image: looked for {root / key} with {', '.join(IMAGE_EXTENSIONS)}")
        samples.append(Sample(image, caption.strip()))
    return samples


def _from_captions(root: Path) -> list[Sample]:
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    samples = []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise DataError(image, f"has no caption: expected {caption.name} beside it (or a {METADATA} in {root})")
        try:
            text = caption.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            raise DataError(caption, f"is not UTF-8 text ({e})") from e
        samples.append(Sample(image, text))
    return samples


def scan_dataset(root, check_images: bool = True) -> list[Sample]:
    """The samples of a data folder, in a stable order. Raises DataError on the first problem."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "is not a folder")
    if (root / METADATA).is_file():
        samples = _from_metadata(root)
    elif (root / KOHYA_METADATA).is_file():
        samples = _from_kohya_metadata(root)
    else:
        samples = _from_captions(root)
    if not samples:
        raise DataError(root, f"holds no images ({', '.join(IMAGE_EXTENSIONS)}) with captions")
    if check_images:
        for s in samples:
            _check_image(s.image)
    return samples


def load_image(
    path: Path, resolution: int, crop: str = "center", rng: random.Random | None = None, flip: bool = False
) -> torch.Tensor:
    """An image as a (resolution, resolution, 3) float tensor in [0, 1] (ComfyUI's IMAGE layout):
    shorter side resized to `resolution` (bicubic), then a center or random square crop."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = resolution / min(w, h)
            size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
            im = im.resize(size, Image.BICUBIC)
    except Exception as e:
        raise DataError(path, f"could not be decoded ({type(e).__name__}: {e})") from e
    w, h = im.size
    if crop == "center":
        left, top = (w - resolution) // 2, (h - resolution) // 2
    elif crop == "random":
        rng = rng or random.Random(0)
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    else:
        raise ValueError(f"crop must be 'center' or 'random', not {crop!r}")
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Indexed by (sample index, stream position); the position seeds the random crop and flip,
    so a resumed run reads exactly the pixels an uninterrupted one would."""

    def __init__(self, samples: list[Sample], resolution: int, crop: str = "center", flip: bool = False, seed: int = 0):
        self.samples, self.resolution, self.crop, self.flip, self.seed = samples, resolution, crop, flip, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, position = key if isinstance(key, tuple) else (key, 0)
        rng = random.Random(self.seed * 1_000_003 + position)
        flip = self.flip and rng.random() < 0.5
        s = self.samples[index]
        return {
            "index": index,
            "pixels": load_image(s.image, self.resolution, self.crop, rng, flip),
            "caption": s.caption,
        }


class StreamSampler(torch.utils.data.Sampler):
    """An endless, resumable stream of batches for one process: the dataset is shuffled once per
    epoch with a generator seeded by (seed, epoch), the stream is cut into global batches of
    batch_size * world_size and this process takes its slice. Micro-batch m is the same whatever
    step the run started from, so resuming replays exactly the data of an uninterrupted run."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        shuffle: bool = True,
    ):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.start, self.shuffle = (
            n,
            batch_size,
            seed,
            rank,
            world_size,
            start,
            shuffle,
        )
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
            else:
                self._perms = {epoch: list(range(self.n))}
        return self._perms[epoch]

    def batch(self, micro: int) -> list[tuple[int, int]]:
        """(sample index, stream position) pairs of micro-batch `micro` on this process."""
        first = (micro * self.world + self.rank) * self.batch_size
        return [(self._perm(q // self.n)[q % self.n], q) for q in range(first, first + self.batch_size)]

    def __iter__(self):
        micro = self.start
        while True:
            yield self.batch(micro)
            micro += 1

    def __len__(self):  # endless; DataLoader only needs this for len(), which is never asked
        return 2**62


def collate(items: list[dict]) -> dict:
    return {
        "index": torch.tensor([i["index"] for i in items]),
        "pixels": torch.stack([i["pixels"] for i in items]),
        "caption": [i["caption"] for i in items],
    }
