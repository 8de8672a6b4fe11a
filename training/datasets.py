"""The stream of micro-batches a script trains on: images and captions from the data folder
(training.data), either encoded once up front (cached) or decoded per micro-batch, in the
resumable order of training.data.StreamSampler."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from .base_model import Base
from .encoding import Encoder, lcm_repeat

log = logging.getLogger("mole.training")


def cache_key(sample, resolution: int, checkpoint) -> str:
    """The name of a sample's cache file: a hash of what its encoding depends on (the base
    checkpoint's file, the image file, the caption, the resolution; center crop, no flip), so a
    changed image, caption or model never reads a stale entry."""

    def identity(path):
        st = Path(path).stat()
        return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]

    blob = json.dumps([identity(checkpoint), identity(sample.image), sample.caption, resolution, "center"])
    return hashlib.sha1(blob.encode()).hexdigest()


def build_disk_cache(files: list[Path], encode, rank: int = 0, world: int = 1) -> int:
    """Encode the missing entries of this process's shard (every world-th file from rank) with
    encode(index) -> {name: tensor}; each file is written whole or not at all (temporary file,
    then rename), so a killed run leaves no half entry. Returns the number encoded."""
    from safetensors.torch import save_file

    made = 0
    for index in range(rank, len(files), world):
        path = files[index]
        if path.is_file():
            continue
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in encode(index).items()}, str(tmp))
        os.replace(tmp, path)
        made += 1
    return made


class DiskCachedDataset(torch.utils.data.Dataset):
    """Latents and text embeddings read from the on-disk cache, one file per image: memory per
    process is a batch, whatever the size of the data set."""

    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        from safetensors.torch import load_file

        index, position = key
        entry = load_file(str(self.files[index]))
        return {
            "index": index,
            "position": position,
            "latent": entry["latent"],
            "context": entry["context"],
            "y": entry.get("y"),
        }


def collate_cached(items):
    return {
        "index": torch.tensor([i["index"] for i in items]),
        "position": torch.tensor([i["position"] for i in items]),
        "latents": torch.cat([i["latent"] for i in items]),
        "context": lcm_repeat([i["context"] for i in items]),
        "y": None if items[0]["y"] is None else torch.cat([i["y"] for i in items]),
    }


def collate_pixels(items):
    from .data import collate

    out = collate(items)
    out["position"] = torch.tensor([i["position"] for i in items])
    return out


class _PixelDataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        item = self.images[key]
        item["position"] = key[1]
        return item


def scan_data(args):
    """The training images and captions, checked before the model is loaded (a bad file stops
    the run at once, naming it)."""
    from .data import DataError, scan_dataset

    try:
        return scan_dataset(args.data)
    except DataError as e:
        raise SystemExit(f"error: bad training data: {e}") from e


def build_data(args, samples, base: Base, accelerator, start_micro: int):
    """(DataLoader of endless micro-batches for this process, Encoder or None, number of images).
    Cached runs encode every image once into the on-disk cache and free the CLIP and VAE;
    uncached runs keep them and encode per micro-batch."""
    from .data import ImageCaptionDataset, StreamSampler

    log.info(
        "data: %d images from %s (%s crop%s, %d px)",
        len(samples),
        args.data,
        args.crop,
        ", flips" if args.flip else "",
        args.resolution,
    )
    images = ImageCaptionDataset(samples, args.resolution, args.crop, args.flip, args.seed)
    encoder = Encoder(base, args.resolution)
    sampler = StreamSampler(
        len(samples), args.batch_size, args.seed, accelerator.process_index, accelerator.num_processes, start_micro
    )
    if args.cache:
        # One file per image in the cache folder; each process encodes its share of the missing
        # ones, then all read the whole set from disk. A resumed run finds the files made.
        folder = Path(args.cache_dir or Path(args.work_dir) / "cache")
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / f"{cache_key(s, args.resolution, args.checkpoint)}.safetensors" for s in samples]

        def encode(index):
            item = images[(index, 0)]
            context, y = encoder.conditioning([item["caption"]])
            return {"latent": encoder.latents(item["pixels"][None]), "context": context} | (
                {} if y is None else {"y": y}
            )

        t0 = time.perf_counter()
        made = build_disk_cache(files, encode, accelerator.process_index, accelerator.num_processes)
        accelerator.wait_for_everyone()
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise RuntimeError(f"cache: {len(missing)} entries missing after encoding, such as {missing[0]}")
        log.info(
            "cache %s: %d images, %d encoded by this process in %.1f s",
            folder,
            len(files),
            made,
            time.perf_counter() - t0,
        )
        base.free_encoders()
        dataset, collate_fn, encoder, workers = DiskCachedDataset(files), collate_cached, None, args.num_workers
    else:
        dataset, collate_fn, workers = _PixelDataset(images), collate_pixels, args.num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers)
    return loader, encoder, len(samples)
