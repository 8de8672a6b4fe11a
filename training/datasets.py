"""The stream of micro-batches a script trains on: images and captions from the data folder
(training.data), either encoded once up front (cached) or decoded per micro-batch, in the
resumable order of training.data.StreamSampler."""

from __future__ import annotations

import logging
import time

import torch

from .base_model import Base
from .encoding import Encoder, lcm_repeat

log = logging.getLogger("mole.training")


class CachedDataset(torch.utils.data.Dataset):
    """Latents and text embeddings computed once per image (center crop, no flip)."""

    def __init__(self, latents, contexts, ys):
        self.latents, self.contexts, self.ys = latents, contexts, ys

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, key):
        index, position = key
        return {"index": index, "position": position, "latent": self.latents[index], "context": self.contexts[index], "y": self.ys[index]}


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
    Cached runs encode every image once (each process encodes the whole set) and free the
    CLIP and VAE; uncached runs keep them and encode per micro-batch."""
    from .data import ImageCaptionDataset, StreamSampler

    log.info("data: %d images from %s (%s crop%s, %d px)", len(samples), args.data, args.crop, ", flips" if args.flip else "", args.resolution)
    images = ImageCaptionDataset(samples, args.resolution, args.crop, args.flip, args.seed)
    encoder = Encoder(base, args.resolution)
    sampler = StreamSampler(len(samples), args.batch_size, args.seed, accelerator.process_index, accelerator.num_processes, start_micro)
    if args.cache:
        t0 = time.perf_counter()
        latents, contexts, ys = [], [], []
        for i in range(len(samples)):
            item = images[(i, 0)]
            latents.append(encoder.latents(item["pixels"][None]))
            context, y = encoder.conditioning([item["caption"]])
            contexts.append(context)
            ys.append(y)
        log.info("cached latents and text embeddings of %d images in %.1f s", len(samples), time.perf_counter() - t0)
        base.free_encoders()
        dataset, collate_fn, encoder, workers = CachedDataset(latents, contexts, ys), collate_cached, None, 0
    else:
        dataset, collate_fn, workers = _PixelDataset(images), collate_pixels, args.num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers)
    return loader, encoder, len(samples)
