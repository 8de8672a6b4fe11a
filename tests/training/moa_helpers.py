"""Tiny MoA data folders: FastComposer's FFHQ-wild layout (nested <id[:5]>/<id>.{jpg,json,npy},
image_ids_train.txt) or flat, and the plain metadata.jsonl layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CAPTION = "a man and a woman in a park"


def person_segments(size: int) -> np.ndarray:
    """Segment ids: 1 = the man (left, lower three quarters), 2 = the woman (a block on the right)."""
    segments = np.zeros((size, size), dtype=np.int64)
    segments[size // 4 :, : size // 2] = 1
    segments[size // 4 : 3 * size // 4, 5 * size // 8 :] = 2
    return segments


def pixels(rng, size: int) -> np.ndarray:
    return np.kron(rng.rand(4, 4, 3), np.ones((size // 4, size // 4, 1)))  # blocky, not white noise


def write_fastcomposer_item(
    root: Path, image_id: str, image: np.ndarray, segments: np.ndarray, info: dict, nested: bool = True
):
    from PIL import Image

    folder = root / image_id[:5] if nested else root
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255).astype("uint8")).save(folder / f"{image_id}.jpg", quality=95)
    np.save(folder / f"{image_id}.npy", segments)
    (folder / f"{image_id}.json").write_text(json.dumps(info))


def segment(k: int, caption: str, word: str, label: str = "person", occurrence: int = 1) -> dict:
    start = -1
    for _ in range(occurrence):
        start = caption.index(word, start + 1)
    return {"id": k, "word": word, "end": start + len(word), "coco_label": label}


def make_moa_dataset(
    folder: Path, n: int = 2, size: int = 64, layout: str = "ffhq", seed: int = 0, words=("man", "woman")
) -> Path:
    """n images of 'a man and a woman in a park' with a mask per person, in FastComposer's
    nested layout ("ffhq"), flat ("ffhq-flat") or the plain folder layout ("folder"); `words`: the
    persons annotated as segments (the others stay plain caption words)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    ids, lines = [], []
    for i in range(n):
        image, segments = pixels(rng, size), person_segments(size)
        name = f"{70000 + i:07d}"  # FFHQ-wild ids are long; the first 5 characters name the folder
        if layout.startswith("ffhq"):
            ids_of = {"man": 1, "woman": 2}
            info = {"caption": CAPTION, "segments": [segment(ids_of[w], CAPTION, w) for w in words]}
            write_fastcomposer_item(folder, name, image, segments, info, nested=layout == "ffhq")
            ids.append(name)
        else:
            Image.fromarray((image * 255).astype("uint8")).save(folder / f"{name}.png")
            for k, word in ((1, "man"), (2, "woman")):
                Image.fromarray(((segments == k) * 255).astype("uint8")).save(folder / f"{name}_{word}.png")
            lines.append(
                json.dumps(
                    {
                        "file_name": f"{name}.png",
                        "text": CAPTION,
                        "subjects": [
                            {"word": "man", "mask": f"{name}_man.png"},
                            {"word": "woman", "mask": f"{name}_woman.png"},
                        ],
                    }
                )
            )
    if layout.startswith("ffhq"):
        (folder / "image_ids_train.txt").write_text("\n".join(ids) + "\n")
    else:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
