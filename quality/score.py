"""Score a rendered run (RUN/manifest.jsonl) with the chosen metrics into RUN/scores.csv
(id, method, seed, metric, value: the metric's own scale, e.g. HPS as a cosine, not in %).

    python3 -m quality score RUN --metric hps --metric imagereward      # MoLE's table
    python3 -m quality score RUN --metric face --metric clip            # MoA's table

Resumable: images already scored for a metric are skipped. Metrics load one at a time (their
models do not share memory); a metric that cannot load stops before anything is scored with it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from . import metrics as metric_defs

FIELDS = ["id", "method", "seed", "metric", "value"]


def _manifest(run: Path) -> list[dict]:
    path = run / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest (render with `python3 -m quality generate` first)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score_run(run: Path, metrics: dict[str, metric_defs.Metric | None], device=None, options=None) -> Path:
    """metrics: {name: a Metric, or None to load it}. Returns RUN/scores.csv."""
    from tqdm import tqdm

    run = Path(run)
    rows = _manifest(run)
    path = run / "scores.csv"
    done = set()
    if path.is_file():
        with path.open(newline="") as f:
            done = {(r["id"], r["method"], int(r["seed"]), r["metric"]) for r in csv.DictReader(f)}
    new_file = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            writer.writeheader()
        for name, metric in metrics.items():
            todo = [r for r in rows if (r["id"], r["method"], r["seed"], name) not in done]
            if not todo:
                continue
            metric = metric or metric_defs.load(name, device=device, **(options or {}).get(name, {}))
            if metric.needs_reference and any(not r.get("reference") for r in todo):
                missing = next(r for r in todo if not r.get("reference"))
                raise ValueError(
                    f"metric {name!r} needs a reference image per image; {missing['image']} has none "
                    "(render MoA protocol prompts, which name their subject)"
                )
            for r in tqdm(todo, desc=name, unit="image", dynamic_ncols=True):
                reference = run / r["reference"] if r.get("reference") else None
                value = metric.score(run / r["image"], r["prompt"], reference)
                writer.writerow(
                    {
                        "id": r["id"],
                        "method": r["method"],
                        "seed": r["seed"],
                        "metric": name,
                        "value": repr(float(value)),
                    }
                )
                f.flush()
            del metric
    return path


def add_arguments(parser):
    parser.add_argument("run", type=Path, help="a run folder from `quality generate`")
    parser.add_argument("--metric", action="append", choices=sorted(metric_defs.LOADERS), required=True)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when there is one)")
    parser.add_argument("--hps-checkpoint", default=None, help="HPS_v2_compressed.pt, if not from the hub cache")
    parser.add_argument(
        "--hps-version",
        default="v2.0",
        choices=["v2.0", "v2.1"],
        help="v2.0: the MoLE paper's (2023) model; v2.1: the later one (not comparable)",
    )


def main(args):
    import torch

    options = {"hps": {"checkpoint": args.hps_checkpoint, "version": args.hps_version}}
    try:
        path = score_run(
            args.run, {m: None for m in args.metric}, torch.device(args.device) if args.device else None, options
        )
    except (FileNotFoundError, ValueError, metric_defs.MetricUnavailable) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"scores: {path}")
