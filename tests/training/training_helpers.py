"""Helpers of the training-script tests: tiny generated datasets, the scripts run as their
command lines (python -m training.<script>, or under a launcher such as accelerate launch)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import hostenv
import torch

REPO = hostenv.REPO


def make_dataset(folder: Path, n: int = 2, size: int = 64, seed: int = 0, layout: str = "captions") -> Path:
    """n PNG images (size x size, smooth random colour fields so the VAE sees structure) with
    captions: same-name .txt files (kohya) or a metadata.jsonl (diffusers imagefolder)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    lines = []
    for i in range(n):
        coarse = rng.rand(4, 4, 3)
        pixels = np.kron(coarse, np.ones((size // 4, size // 4, 1)))  # blocky, not white noise
        Image.fromarray((pixels * 255).astype("uint8")).save(folder / f"img{i}.png")
        caption = f"a close-up photo, sample {i}"
        if layout == "captions":
            (folder / f"img{i}.txt").write_text(caption)
        else:
            lines.append(json.dumps({"file_name": f"img{i}.png", "text": caption}))
    if layout == "jsonl":
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def script_env() -> dict:
    env = dict(os.environ)
    # Two cores shared with other work: one OpenMP thread per process is several times faster
    # here than two threads that wait on each other at every barrier.
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_script(
    module: str, *args, launcher: list[str] | None = None, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run `python -m training.<module> args...` (or under `launcher`, such as accelerate
    launch) from the repository root, as a user would."""
    cmd = (launcher or [sys.executable]) + ["-m", f"training.{module}"] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
        )
    return proc


def run_training(module: str, *args):
    """`python -m training.<module> args...` run in this process (training.<module>.main(argv),
    which returns the run's loop.Result): the code path after the command line is the same, without
    a new interpreter importing torch, Accelerate and ComfyUI (~6 s of a ~12 s tiny run here). A
    failing run raises (SystemExit with the script's message). Every script still runs as a command
    in test_data.py (--help, refusals before a model loads), and mole_expert under `accelerate
    launch` with two processes."""
    return importlib.import_module(f"training.{module}").main([str(a) for a in args])


def read_log(work_dir) -> list[dict]:
    with open(Path(work_dir) / "log.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def tiny_args(checkpoint, data, output, steps, **extra) -> list[str]:
    """The common arguments of a tiny CPU run: 64 px, batch 1, a few steps."""
    args = ["--checkpoint", checkpoint, "--data", data, "--output", output, "--resolution", "64", "--steps", str(steps)]
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return [str(a) for a in args]


def ksample(sd15, model, seed: int = 7, size: int = 64):
    """One KSampler step (euler, cfg 2) at size x size with fixed prompts."""
    import nodes

    positive = nodes.CLIPTextEncode().encode(sd15.clip, "a photo of a woman waving")[0]
    negative = nodes.CLIPTextEncode().encode(sd15.clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    (out,) = nodes.common_ksampler(model, seed, 1, 2.0, "euler", "normal", positive, negative, latent)
    return out["samples"]


def make_moa_dataset(folder: Path, n: int = 2, size: int = 64, layout: str = "ffhq", seed: int = 0) -> Path:
    """n images of 'a man and a woman' with a mask per person (left half: the man, a block on
    the right: the woman), in the FFHQ-FastComposer layout or the plain folder layout."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    caption = "a man and a woman in a park"
    ids, lines = [], []
    for i in range(n):
        pixels = np.kron(rng.rand(4, 4, 3), np.ones((size // 4, size // 4, 1)))
        segments = np.zeros((size, size), dtype=np.int64)
        segments[size // 4 :, : size // 2] = 1  # the man
        segments[size // 4 : 3 * size // 4, 5 * size // 8 :] = 2  # the woman
        name = f"{i:05d}"
        if layout == "ffhq":
            Image.fromarray((pixels * 255).astype("uint8")).save(folder / f"{name}.jpg")
            np.save(folder / f"{name}.npy", segments)
            info = {
                "caption": caption,
                "segments": [
                    {"id": 1, "word": "man", "end": caption.index("man") + 3, "coco_label": "person"},
                    {"id": 2, "word": "woman", "end": caption.index("woman") + 5, "coco_label": "person"},
                ],
            }
            (folder / f"{name}.json").write_text(json.dumps(info))
            ids.append(name)
        else:
            Image.fromarray((pixels * 255).astype("uint8")).save(folder / f"{name}.png")
            for k, word in ((1, "man"), (2, "woman")):
                Image.fromarray(((segments == k) * 255).astype("uint8")).save(folder / f"{name}_{word}.png")
            lines.append(
                json.dumps(
                    {
                        "file_name": f"{name}.png",
                        "text": caption,
                        "subjects": [
                            {"word": "man", "mask": f"{name}_man.png"},
                            {"word": "woman", "mask": f"{name}_woman.png"},
                        ],
                    }
                )
            )
    if layout == "ffhq":
        (folder / "image_ids_train.txt").write_text("\n".join(ids) + "\n")
    else:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
