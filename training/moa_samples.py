"""MoA training samples: what one training item holds, read from a scanned sample
(training.moa_data) at a stream position.

As FastComposer trains (``scripts/run_training.sh``): at most 4 subjects per image
(``--max_num_objects 4``, a random 4 of more), each dropped with probability 0.1
(``--object_appear_prob 0.9``) and the whole condition (caption and subjects) with probability
0.1 (``--uncondition_prob 0.1``; MoA paper Tab. 1 "Prob. of removing condition 0.1"). A dropped
subject keeps its word in the caption as plain text: only the kept subjects are bound.

Subject images are made as FastComposer makes them (mixture_core.subject_images): the segment
of the full, uncropped image on a random-noise background, cropped to its box, (training only:
its augmentations) padded to a square, resized to 224.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixture_core.subject_images import SUBJECT_SIZE, cut_out, noise_background, pad_to_square, resize_square

from .data import load_image
from .moa_data import MoASample, Subject

MAX_SUBJECTS = 4
SUBJECT_DROP = 0.1
CONDITION_DROP = 0.1


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
