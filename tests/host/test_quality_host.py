"""The quality pipeline end to end on the real host: `python3 -m quality generate` renders the MoA
protocol's prompts for base, MoLE and MoA through ComfyUI's executor (the shallow random-weight
SD1.5-family checkpoint and random MoLE/MoA files for it, 64x64, 1 step) and resumes a stopped run (a run with other settings is refused:
tests/quality/test_generate_settings.py);
then the run is scored (random-weight CLIP and FaceNet of the real architectures; MTCNN's real
weights) and reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import hostenv
import numpy as np
import pytest
from helpers import launch
from helpers import moa_weights as aw
from helpers import mole_weights as mw
from helpers import quality_metrics as qm
from helpers import random_models as rm

from quality import moa_protocol, prompts, report, score

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(sd15_small, tmp_path_factory):
    # The pipeline does not depend on the UNet's depth: the shallow model renders it in seconds.
    sd15 = sd15_small
    root = tmp_path_factory.mktemp("quality")
    for folder in ("checkpoints", "loras", "mole", "moa", "clip_vision"):
        (root / folder).mkdir()
    (root / "checkpoints" / "sd15.safetensors").symlink_to(rm.sd15_small_checkpoint())
    (root / "clip_vision" / "vit_l14.safetensors").symlink_to(rm.clip_vision_vit_l14())
    moa = aw.cached_moa_file(sd15.model, seed=11, model_tag=f"sd15small{rm.SD15_SMALL_VERSION}")
    (root / "moa" / "moa.safetensors").symlink_to(moa)
    layers, kohya = mw.target_layers(sd15.model), mw.kohya_names(sd15.model, "diffusers")
    mw.write_lora(root / "loras" / "face.safetensors", layers, kohya, seed=41)
    mw.write_lora(root / "loras" / "hand.safetensors", layers, kohya, seed=42)
    mw.write_pack_gates(root / "mole" / "gates.safetensors", layers)
    (root / "extra_model_paths.yaml").write_text(
        "quality_tests:\n  base_path: "
        + str(root)
        + "\n"
        + "".join(f"  {f}: {f}\n" for f in ("checkpoints", "loras", "mole", "moa", "clip_vision"))
    )
    (root / "refs" / "000001").mkdir(parents=True)
    shutil.copyfile(qm.face_photo(), root / "refs" / "000001" / "0.jpg")  # a real face: the face metric needs one
    prompts.write_jsonl(moa_protocol.single_subject_prompts({"000001": "man"})[:2], root / "prompts.jsonl")
    return root


def generate(root, *extra, out="run", launcher=(sys.executable,), methods=("base", "mole", "moa")):
    command = [
        *launcher,
        "-m",
        "quality",
        "generate",
        root / "prompts.jsonl",
        "--out",
        root / out,
        "--checkpoint",
        "sd15.safetensors",
        *(a for m in methods for a in ("--method", m)),
        "--mole-expert",
        "face.safetensors=face",
        "--mole-expert",
        "hand.safetensors=hand",
        "--mole-gates",
        "gates.safetensors",
        "--moa",
        "moa.safetensors",
        "--clip-vision",
        "vit_l14.safetensors",
        "--reference-dir",
        root / "refs",
        "--width",
        "64",
        "--height",
        "64",
        "--seeds",
        "7",
        "--extra-model-paths-config",
        root / "extra_model_paths.yaml",
        *extra,
    ]
    return subprocess.run(
        list(map(str, command)),
        cwd=hostenv.REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # the same threads: the same float sums in every process
    )


def test_generate_resume_score_report(setup):
    """One runner process; the run folder already holds one finished image (a stopped run): the
    runner renders everything else, in one graph per (prompt, seed), and leaves that one alone."""
    from PIL import Image

    root, run = setup, setup / "run"
    done = {
        "id": "subject_0000_prompt_0001",
        "prompt": "a man wearing a santa hat",
        "seed": 7,
        "method": "mole",
        "image": "images/mole/subject_0000_prompt_0001_s7.png",
        "subject": "000001",
        "reference": "inputs/subject_000001.jpg",
    }
    (run / "images" / "mole").mkdir(parents=True)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(run / done["image"])
    (run / "manifest.jsonl").write_text(json.dumps(done) + "\n")
    before = (run / done["image"]).read_bytes()

    rendered = generate(root, "--steps", "1")
    assert rendered.returncode == 0, rendered.stderr[-4000:]
    assert "0 of 2 (prompt, seed) pairs already rendered; 2 to go" in rendered.stdout
    assert "rendering: 100%" in rendered.stderr and "2/2 [" in rendered.stderr  # the progress bar, with its times
    manifest = [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"][-4:], r["method"], r["seed"]) for r in manifest] == [
        ("0001", "mole", 7),
        ("0000", "base", 7),
        ("0000", "mole", 7),
        ("0000", "moa", 7),
        ("0001", "base", 7),
        ("0001", "moa", 7),
    ]
    assert (run / done["image"]).read_bytes() == before  # not rendered again
    assert all(r["reference"] == "inputs/subject_000001.jpg" for r in manifest)
    assert manifest[1]["prompt"] == "a man wearing a red hat"
    pixels = {r["method"]: np.asarray(Image.open(run / r["image"])) for r in manifest[1:4]}
    assert pixels["base"].shape == (64, 64, 3)
    assert not np.array_equal(pixels["mole"], pixels["base"]) and not np.array_equal(pixels["moa"], pixels["base"])
    assert all((run / r["image"]).is_file() for r in manifest) and not (run / "_render").exists()

    score.score_run(run, {"clip": qm.tiny_clip(), "face": qm.random_face()})
    scored = report.read_scores(run)
    assert len(scored) == 12
    assert all(0.0 <= r["value"] <= 1.0 for r in scored if r["metric"] == "face")  # clipped at 0
    score.score_run(run, {"clip": None, "face": None})  # all scored: nothing is loaded again
    assert len(report.read_scores(run)) == 12
    out = report.write_report(run, paper="moa")
    md = out["markdown"].read_text()
    for method in ("base", "mole", "moa"):
        assert f"| {method} |" in md
    assert "| Mixture-of-Attention | 0.555 | 0.202 |" in md


@pytest.mark.skipif(not launch.AVAILABLE, reason="accelerate's launcher is not installed")
def test_two_processes_render_what_one_does(setup):
    """`accelerate launch` with two CPU processes: each renders its share of 2 prompts x 2 seeds
    (base and MoA: the main process stages MoA's reference image for both), and together
    they leave the same files, pixels and manifest as one process; a rerun after an image was
    lost renders it again in the process whose share it is."""
    from PIL import Image

    root = setup
    args = ("--seeds", "7", "8", "--steps", "1")
    methods = ("base", "moa")  # MoLE renders as base does here: nothing of its own to share out
    one = generate(root, *args, out="one", methods=methods)
    assert one.returncode == 0, one.stderr[-4000:]
    two = generate(root, *args, out="two", launcher=launch.LAUNCH_TWO, methods=methods)
    assert two.returncode == 0, two.stderr[-4000:]
    for index in (0, 1):  # pairs 0, 2 and 1, 3: two each
        assert f"process {index} of 2: 0 of 2 (prompt, seed) pairs already rendered; 2 to go" in two.stdout

    def run_files(run):
        return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())

    def pixels(path):
        return np.asarray(Image.open(path))

    def same_as_one():
        files = run_files(root / "two")
        assert files == run_files(root / "one")  # no process manifests, no render folders left
        assert (root / "two" / "manifest.jsonl").read_text() == (root / "one" / "manifest.jsonl").read_text()
        images = [f for f in files if f.endswith(".png")]
        assert len(images) == 8 and "inputs/subject_000001.jpg" in files
        for f in images:
            assert np.array_equal(pixels(root / "two" / f), pixels(root / "one" / f)), f

    same_as_one()
    manifest = [json.loads(line) for line in (root / "one" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"][-4:], r["seed"], r["method"]) for r in manifest[:4]] == [
        ("0000", 7, "base"),
        ("0000", 7, "moa"),
        ("0000", 8, "base"),
        ("0000", 8, "moa"),
    ]

    (root / "two" / manifest[2]["image"]).unlink()  # pair 1 (seed 8 of the first prompt): process 1's
    again = generate(root, *args, out="two", launcher=launch.LAUNCH_TWO, methods=methods)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "process 0 of 2: 2 of 2 (prompt, seed) pairs already rendered; 0 to go" in again.stdout
    assert "process 1 of 2: 1 of 2 (prompt, seed) pairs already rendered; 1 to go" in again.stdout
    same_as_one()
