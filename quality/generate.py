"""Render a prompt set for "base" and "with the method" at fixed seeds, through the host's own
executor (workflows/run.py: ComfyUI's PromptExecutor with this pack loaded by ComfyUI's loader)
and the pack's graph building blocks (workflows/graphs.py).

    python3 -m quality generate PROMPTS.jsonl --out RUN --checkpoint v1-5-pruned-emaonly.safetensors \\
        --method base --method mole --mole-expert mole_face_sd15.safetensors=face \\
        --mole-expert mole_hand_sd15.safetensors=hand --mole-gates mole_gates_sd15.safetensors --seeds 0

Methods: `base` (the checkpoint alone); `mole` (Load MoLE Experts + Apply MoLE Gating, --mole-mode),
or `mole-local` / `mole-global` / `mole-both` (the paper's Tab. 3 ablation); `moa` (MoA Subject
Inject with the prompt's subject and its reference image: prompts from `quality moa-prompts`).
Every (prompt, seed) is one graph holding all the methods, so they share the seed, the text
encoding and the loaded checkpoint. Images go to RUN/images/<method>/<id>_s<seed>.png and one
line per image to RUN/manifest.jsonl. Running the same command again renders only what is
missing (RUN/run.json keeps the settings; a run with other settings is refused).

Over several GPUs, one process each, the same command under Accelerate's launcher
(quality/processes.py: each process renders its share into the one run folder, resumably; one
manifest at the end, for one `score` and one `report`):

    accelerate launch --multi_gpu --num_processes 4 -m quality generate PROMPTS.jsonl --out RUN ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from . import moa_protocol, processes
from . import prompts as prompt_sets

REPO = Path(__file__).resolve().parents[1]
MOLE_METHODS = {"mole": None, "mole-local": "local", "mole-global": "global", "mole-both": "both"}
METHODS = ("base", *MOLE_METHODS, "moa")


class GenerateError(ValueError):
    pass


def _graphs():
    sys.path.insert(0, str(REPO))
    from workflows import graphs

    return graphs


def settings_from_args(args) -> dict:
    methods = list(dict.fromkeys(args.method or ["base"]))
    experts = []
    for spec in args.mole_expert or []:
        file, _, rest = spec.partition("=")
        name, _, strength = rest.partition(":")
        if not file or not name:
            raise GenerateError(
                f"--mole-expert {spec!r}: expected FILE=NAME or FILE=NAME:STRENGTH (e.g. "
                "mole_face_sd15.safetensors=face)"
            )
        experts.append({"file": file, "name": name, "strength": float(strength or 1.0)})
    settings = {
        "checkpoint": args.checkpoint,
        "methods": methods,
        "seeds": list(args.seeds),
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "cfg": args.cfg,
        "sampler": args.sampler,
        "scheduler": args.scheduler,
        "negative": args.negative,
    }
    if any(m in MOLE_METHODS for m in methods):
        if not experts or len(experts) > 2 or not args.mole_gates:
            raise GenerateError("a MoLE method needs --mole-expert FILE=NAME (one or two) and --mole-gates FILE")
        settings["mole"] = {
            "experts": experts,
            "gates": args.mole_gates,
            "mode": args.mole_mode,
            "strength": args.mole_strength,
        }
    if "moa" in methods:
        if not (args.moa and args.clip_vision and args.reference_dir):
            raise GenerateError("the moa method needs --moa FILE, --clip-vision FILE and --reference-dir DIR")
        settings["moa"] = {
            "file": args.moa,
            "clip_vision": args.clip_vision,
            "reference_dir": str(Path(args.reference_dir).resolve()),
        }
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise GenerateError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    return settings


def image_path(method: str, item_id: str, seed: int) -> str:
    return f"images/{method}/{item_id}_s{seed}.png"


def build_graph(item: dict, seed: int, methods: list[str], settings: dict, reference: str | None):
    """One API-format graph rendering `item` at `seed` with each method: {SaveImage id: method}."""
    graphs = _graphs()
    sampling = graphs.Settings(
        settings["sampler"],
        settings["scheduler"],
        settings["steps"],
        settings["cfg"],
        settings["width"],
        "the quality run's settings (run.json)",
    )
    g = graphs.Graph(f"{item['id']}_s{seed}", "quality", "", "", sampling)
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=settings["checkpoint"])
    model, clip, vae = ckpt[0], ckpt[1], ckpt[2]
    negative = graphs.encode(g, clip, settings["negative"], "negative")
    empty = g.add("EmptyLatentImage", width=settings["width"], height=settings["height"], batch_size=1)[0]

    def render(method, patched, positive):
        images = graphs.sample(g, patched, positive, negative, empty, vae, method, seed=seed)
        return g.add("SaveImage", f"Save: {method}", images=images, filename_prefix=f"quality/{method}").node_id

    saves = {}
    positive = None
    experts = None
    for method in methods:
        if method == "base" or method in MOLE_METHODS:
            positive = positive or graphs.encode(g, clip, item["prompt"], "prompt")
        if method == "base":
            saves[render(method, model, positive)] = method
        elif method in MOLE_METHODS:
            mole = settings["mole"]
            if experts is None:
                first, second = mole["experts"][0], (mole["experts"][1:] or [None])[0]
                experts = g.add(
                    "MoLE_LoadExperts",
                    expert_1=first["file"],
                    name_1=first["name"],
                    strength_1=first["strength"],
                    expert_2=second["file"] if second else "None",
                    name_2=second["name"] if second else "hand",
                    strength_2=second["strength"] if second else 1.0,
                )[0]
            gated = g.add(
                "MoLE_ApplyGating",
                method,
                model=model,
                experts=experts,
                gates=mole["gates"],
                mode=MOLE_METHODS[method] or mole["mode"],
                strength=mole["strength"],
            )[0]
            saves[render(method, gated, positive)] = method
        elif method == "moa":
            moa = settings["moa"]
            router = g.add("MoA_LoadRouter", moa_name=moa["file"])[0]
            vision = g.add("CLIPVisionLoader", clip_name=moa["clip_vision"])[0]
            subject = graphs.load_image(g, ("input", reference), "subject")
            patched, moa_positive = graphs.inject(
                g, model, router, clip, vision, item["prompt"], item["subject_word"], [subject], "MoA"
            )
            saves[render(method, patched, moa_positive)] = method
    return g.nodes, saves


def _check_settings(out: Path, settings: dict, prompts_path: Path, write: bool = True):
    saved = out / "run.json"
    record = {"prompts": str(Path(prompts_path).resolve()), **settings}
    if saved.is_file():
        before = json.loads(saved.read_text())
        changed = sorted(k for k in set(before) | set(record) if before.get(k) != record.get(k) and k != "seeds")
        if changed:
            raise GenerateError(
                f"{out} holds a run with other settings ({', '.join(changed)} differ; see {saved}): "
                "use another --out, or the same settings to resume"
            )
        record["seeds"] = list(dict.fromkeys(before.get("seeds", []) + record["seeds"]))  # more seeds: allowed
    out.mkdir(parents=True, exist_ok=True)
    if write:  # one writer (the main process), through a rename: no process reads half a file
        tmp = saved.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(saved)


def _stage_references(items: list[dict], settings: dict, inputs: Path, copy: bool = True) -> dict[str, str]:
    """Each subject's reference image copied into the run's input folder (ComfyUI's LoadImage
    lists only the top of its input folder): {subject: file name there}. copy=False: the names
    only (another process copies)."""
    inputs.mkdir(parents=True, exist_ok=True)
    names = {}
    for item in items:
        subject = item.get("subject")
        if subject is None:
            raise GenerateError(
                f"prompt {item['id']}: the moa method needs prompts with a 'subject' and a "
                "'subject_word' (python3 -m quality moa-prompts)"
            )
        if subject in names:
            continue
        source = (
            Path(item["reference"])
            if item.get("reference")
            else moa_protocol.reference_image(settings["moa"]["reference_dir"], subject)
        )
        names[subject] = f"subject_{subject}{source.suffix.lower()}"
        if copy:
            shutil.copyfile(source, inputs / names[subject])
    return names


def generate(
    prompts_path: Path, out: Path, settings: dict, extra_model_paths: list[str] = (), limit: int | None = None
):
    """Render what is missing (this process's share of it, when launched as several processes:
    quality/processes.py); returns the manifest rows (all of them, old and new)."""
    procs = processes.processes()
    items = prompt_sets.read_jsonl(prompts_path)[:limit]
    out = Path(out)
    _check_settings(out, settings, prompts_path, write=procs.main)
    manifest = processes.read_all(out)
    done = {(r["id"], r["seed"], r["method"]) for r in manifest if (out / r["image"]).is_file()}
    pairs = [(item, seed) for item in items for seed in settings["seeds"]]
    todo = []
    for item, seed in processes.share(pairs, procs):
        missing = [m for m in settings["methods"] if (item["id"], seed, m) not in done]
        if missing:
            todo.append((item, seed, missing))
    share = len(processes.share(pairs, procs))
    print(f"{procs.label()}{share - len(todo)} of {share} (prompt, seed) pairs already rendered; {len(todo)} to go")

    references = {}
    if "moa" in settings["methods"] and (todo or procs.count > 1):
        references = _stage_references(items, settings, out / "inputs", copy=procs.main)
        procs.wait()  # the images are in place before any process loads one
    if todo:
        manifest += _render(todo, out, settings, references, extra_model_paths, procs)
    procs.wait()
    if procs.main:
        where = {item["id"]: i for i, item in enumerate(items)}
        seeds = {s: i for i, s in enumerate(settings["seeds"])}
        methods = {m: i for i, m in enumerate(settings["methods"])}
        # The order one process renders in (prompt, seed, method).
        manifest = processes.merge(
            out, lambda r: (where.get(r["id"], len(where)), seeds.get(r["seed"], 0), methods.get(r["method"], 0))
        )
        shutil.rmtree(out / "_render", ignore_errors=True)
    return manifest


def _render(todo, out: Path, settings: dict, references: dict, extra_model_paths, procs) -> list[dict]:
    """Render (item, seed, methods) graphs in this process; returns the new manifest rows."""
    sys.path.insert(0, str(REPO))
    from workflows import run as runner

    render_dir = processes.render_dir(out, procs)
    runner.start_host(list(extra_model_paths), str(out / "inputs") if references else None, str(render_dir))
    graphs = [
        (item, seed, *build_graph(item, seed, methods, settings, references.get(item.get("subject"))))
        for item, seed, methods in todo
    ]
    runner.check_files({f"{item['id']} seed {seed}": prompt for item, seed, prompt, _ in graphs})
    executor = runner.new_executor()

    from tqdm import tqdm

    manifest_path = processes.manifest_path(out, procs)
    rows = []
    started = time.monotonic()
    with (
        manifest_path.open("a") as log,
        tqdm(
            total=len(graphs),
            unit="prompt",
            desc=f"rendering{f' [{procs.index}]' if procs.count > 1 else ''}",
            position=procs.index,
            dynamic_ncols=True,
        ) as bar,
    ):
        for item, seed, prompt, saves in graphs:
            images = runner.execute(executor, prompt, f"{item['id']} seed {seed}")
            for node_id, method in saves.items():
                (saved,) = images[node_id]
                target = out / image_path(method, item["id"], seed)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(saved, target)
                row = {
                    "id": item["id"],
                    "prompt": item["prompt"],
                    "seed": seed,
                    "method": method,
                    "image": image_path(method, item["id"], seed),
                }
                if item.get("subject"):  # every method's image can be compared with the subject
                    row["subject"] = item["subject"]
                    if item["subject"] in references:
                        row["reference"] = f"inputs/{references[item['subject']]}"
                log.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows.append(row)
            log.flush()  # a stopped run resumes after the last finished prompt
            bar.update(1)
    shutil.rmtree(render_dir, ignore_errors=True)
    print(
        f"{procs.label()}{len(graphs)} prompt(s) x {len(settings['methods'])} method(s) in "
        f"{time.monotonic() - started:.1f} s; manifest: {out / processes.MANIFEST}"
    )
    return rows


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument(
        "prompts", type=Path, help="a prompt set (.jsonl from `quality prompts` or `quality moa-prompts`)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the run folder (images, manifest.jsonl, run.json)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file name in models/checkpoints")
    parser.add_argument("--method", action="append", choices=METHODS, help="repeatable; default: base")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="fixed seeds, one image each per prompt")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--negative", default="", help="negative prompt (default: none)")
    parser.add_argument(
        "--mole-expert",
        action="append",
        help="FILE=NAME[:STRENGTH] in models/loras, e.g. mole_face_sd15.safetensors=face (repeat for the hand expert)",
    )
    parser.add_argument("--mole-gates", help="gate file in models/mole")
    parser.add_argument("--mole-mode", default="both", choices=["both", "local", "global"])
    parser.add_argument("--mole-strength", type=float, default=1.0)
    parser.add_argument("--moa", help="MoA file in models/moa")
    parser.add_argument("--clip-vision", help="CLIP ViT-L/14 vision model in models/clip_vision")
    parser.add_argument("--reference-dir", type=Path, help="REFERENCE_DIR/<subject>/*.jpg: the subjects' images")
    parser.add_argument(
        "--protocol",
        choices=["moa"],
        default=None,
        help="moa: FastComposer's settings (512x512, 50 steps, cfg 5, UniPC, seeds 0-3) over the values above",
    )
    parser.add_argument("--extra-model-paths-config", action="append", default=[], help="extra_model_paths.yaml")
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")


def main(args):
    if args.protocol == "moa":
        for key, value in moa_protocol.SETTINGS.items():
            setattr(args, key, value)
    try:
        settings = settings_from_args(args)
        generate(args.prompts, args.out, settings, args.extra_model_paths_config, args.limit)
    except (GenerateError, prompt_sets.PromptSetError) as e:
        raise SystemExit(f"error: {e}") from None
