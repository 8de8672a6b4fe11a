"""MoA training throughput: samples per second of one training step (forward + backward), the
batched step (one UNet call, one VAE call, one image-encoder call per batch) against the loop it
replaced (one call of each per sample), at batch 1 and 4.

    /work/tools/heavy python3 -m bench.bench_moa_train [--resolution 64] [--batches 1 4] [--subjects 1]
        [--reps 2] [--threads 2]

Runs the real trainer (training.moa_train.main, 1 step) on the random SD1.5 checkpoint and
random CLIP ViT-L/14 of the tests to build the stage model, then times, interleaved, on a
generated two-person data folder (FastComposer layout, subject images augmented as in training,
--subjects of the two bound per image; on a CPU, CLIP ViT-L/14 at 224 px costs seconds per
subject image and dominates):

* loop: the batch's samples one at a time (the trainer before batching), losses averaged;
* batched: the whole batch in one call.

Both compute the same loss (the same draws per sample); the gradient of the batched step
matches the loop's within float tolerance. On a GPU (--device cuda, when one is there) the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "training"))
sys.path.append(str(Path(__file__).resolve().parents[1]))


def build(resolution: int, work: Path):
    from helpers import random_models as rm
    from moa_helpers import make_moa_dataset

    from training import moa_train

    data = make_moa_dataset(work / "data", n=4, size=max(64, resolution))
    result = moa_train.main(
        [
            "--checkpoint",
            str(rm.sd15_checkpoint()),
            "--clip-vision",
            str(rm.clip_vision_vit_l14()),
            "--data",
            str(data),
            "--output",
            str(work / "moa.safetensors"),
            "--resolution",
            str(resolution),
            "--steps",
            "1",
            "--lr",
            "1e-5",
            "--cond-drop",
            "0",
            "--subject-drop",
            "0",
            "--max-subjects",
            "1",
        ]
    )
    return result.stage.model, data


def batch_of(data_folder, resolution: int, size: int, start: int, subjects: int):
    from training import moa_data, moa_samples

    draws = moa_samples.Draws(condition_drop=0, subject_drop=0, max_subjects=subjects)
    dataset = moa_samples.MoADataset(moa_data.scan_moa_dataset(data_folder), resolution, draws)
    return moa_samples.collate_list([dataset[((start + i) % len(dataset), start + i)] for i in range(size)])


def step(model, batch, per_sample: bool) -> None:
    if per_sample:
        n = len(batch["items"])
        for i in range(n):
            one = {
                "items": batch["items"][i : i + 1],
                "index": batch["index"][i : i + 1],
                "position": batch["position"][i : i + 1],
            }
            (model(one) / n).backward()
    else:
        model(batch).backward()
    for p in model.parameters():
        p.grad = None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--subjects", type=int, default=1, choices=(1, 2), help="subjects bound per image")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, data = build(args.resolution, Path(tmp))
        model.train()
        print(
            f"MoA training step, {args.resolution} px, {args.subjects} subject(s) per image, "
            f"{torch.get_num_threads()} threads, device {next(model.moa.parameters()).device}"
        )
        print(f"{'batch':>5} {'loop samples/s':>15} {'batched samples/s':>18} {'ratio':>6}")
        for size in args.batches:
            batch = batch_of(data, args.resolution, size, 0, args.subjects)
            step(model, batch, False)  # warm-up (allocator, text cache)
            times = {True: [], False: []}
            for _ in range(args.reps):
                for per_sample in (True, False):  # interleaved
                    t = time.perf_counter()
                    step(model, batch, per_sample)
                    times[per_sample].append(time.perf_counter() - t)
            loop, batched = (size / statistics.median(times[k]) for k in (True, False))
            print(f"{size:>5} {loop:>15.3f} {batched:>18.3f} {batched / loop:>6.2f}")


if __name__ == "__main__":
    main()
