"""The papers' tables for a scored run: method x metric, mean and 95% interval over prompts,
in the papers' units (HPS and IR in %), as Markdown (RUN/report.md) and CSV (RUN/report.csv),
with each method's paired difference from `base` and a plot of the per-prompt differences
(RUN/report_differences.png); the papers' own numbers are quoted beside it with their source.

Statistics: each prompt's score is the mean over its seeds; a method's score is the mean over
prompts, its interval mean +- t(0.975, n-1) * sd / sqrt(n). The papers report something else:
MoLE the mean +- standard error over three draws of 3k prompts, MoA the mean alone. A paired
difference uses only prompts that both methods have.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

from . import metrics as metric_defs
from . import moa_protocol

# MoLE paper Sec. 4 (HPS (%), IR (%): mean +- standard error over three repeats).
PAPER_TABLES = {
    "mole-coco": {
        "source": "MoLE paper, Tab. 1 (COCO Human Prompts)",
        "metrics": ["hps", "imagereward"],
        "rows": {
            "VQ-Diffusion": ("19.21 ± 0.04", "-12.51 ± 2.44"),
            "Versatile Diffusion": ("19.75 ± 0.09", "-8.81 ± 1.40"),
            "SD XL": ("20.84 ± 0.06", "73.34 ± 2.29"),
            "SD v1.5": ("19.91 ± 0.09", "28.34 ± 1.40"),
            "MoLE": ("20.27 ± 0.07", "33.75 ± 1.49"),
        },
    },
    "mole-diffusiondb": {
        "source": "MoLE paper, Tab. 1 (DiffusionDB Human Prompts)",
        "metrics": ["hps", "imagereward"],
        "rows": {
            "VQ-Diffusion": ("19.00 ± 0.02", "-18.42 ± 1.49"),
            "Versatile Diffusion": ("20.09 ± 0.04", "-29.05 ± 2.72"),
            "SD XL": ("21.51 ± 0.07", "87.88 ± 2.53"),
            "SD v1.5": ("20.29 ± 0.01", "-2.72 ± 1.66"),
            "MoLE": ("20.62 ± 0.04", "4.36 ± 1.36"),
        },
    },
    "mole-stages": {
        "source": "MoLE paper, Tab. 2 (stages, COCO Human Prompts)",
        "metrics": ["hps", "imagereward"],
        "rows": {
            "SD v1.5": ("19.91 ± 0.09", "28.34 ± 1.40"),
            "+Stage 1": ("20.16 ± 0.09", "31.01 ± 1.75"),
            "+Stage 2": ("19.94 ± 0.07", "25.66 ± 2.72"),
            "+Stage 3": ("20.27 ± 0.07", "33.75 ± 1.49"),
        },
    },
    "mole-assignment": {
        "source": "MoLE paper, Tab. 3 (assignment, COCO Human Prompts)",
        "metrics": ["hps", "imagereward"],
        "rows": {
            "SD v1.5": ("19.91 ± 0.09", "28.34 ± 1.40"),
            "Local": ("20.19 ± 0.04", "31.98 ± 2.41"),
            "Global": ("20.20 ± 0.02", "32.20 ± 0.86"),
            "Both": ("20.27 ± 0.07", "33.75 ± 1.49"),
        },
    },
    "moa": {
        **moa_protocol.PAPER_TABLE,
        "rows": {k: tuple(f"{v:.3f}" for v in vs) for k, vs in moa_protocol.PAPER_TABLE["rows"].items()},
    },
}


def t_quantile(df: int) -> float:
    """t(0.975, df); the normal quantile where scipy is missing (close past ~30 prompts)."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return 1.959964


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% t-interval; a single value has no width (nan bounds)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def read_scores(run: Path) -> list[dict]:
    path = Path(run) / "scores.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scores (run `python3 -m quality score {run}` first)")
    with path.open(newline="") as f:
        return [dict(row, seed=int(row["seed"]), value=float(row["value"])) for row in csv.DictReader(f)]


def per_prompt(scores: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """{(metric, method): {prompt id: mean over seeds, in the papers' unit}}."""
    sums = defaultdict(lambda: defaultdict(list))
    for row in scores:
        sums[(row["metric"], row["method"])][row["id"]].append(row["value"] * metric_defs.SCALES[row["metric"]])
    return {key: {pid: sum(v) / len(v) for pid, v in by_prompt.items()} for key, by_prompt in sums.items()}


def summarize(scores: list[dict]) -> list[dict]:
    """One row per (method, metric): n prompts, mean, 95% interval, and the paired difference from base."""
    table = per_prompt(scores)
    methods = sorted({m for _, m in table}, key=lambda m: (m != "base", m))
    metrics = [m for m in metric_defs.LOADERS if any(k[0] == m for k in table)]
    rows = []
    for method in methods:
        for metric in metrics:
            values = table.get((metric, method))
            if not values:
                continue
            mean, low, high = interval(list(values.values()))
            row = {
                "method": method,
                "metric": metric,
                "label": metric_defs.LABELS[metric],
                "n_prompts": len(values),
                "mean": mean,
                "ci_low": low,
                "ci_high": high,
            }
            base = table.get((metric, "base"))
            if method != "base" and base:
                shared = sorted(set(values) & set(base))
                if shared:
                    d, dl, dh = interval([values[p] - base[p] for p in shared])
                    row |= {"diff_vs_base": d, "diff_ci_low": dl, "diff_ci_high": dh}
            rows.append(row)
    return rows


def _cell(mean, low, high, digits):
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown(rows: list[dict], paper: str | None, run: Path) -> str:
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["metric"]): r for r in rows}
    digits = {m: (2 if metric_defs.SCALES[m] != 1.0 else 3) for m in metrics}
    lines = [
        f"# Quality of {Path(run).name}",
        "",
        "Mean over prompts [95% interval]; each prompt's score is the mean over its seeds. "
        "Δ: the paired difference from base.",
        "",
        "| method | " + " | ".join(f"{metric_defs.LABELS[m]} | Δ {metric_defs.LABELS[m]}" for m in metrics) + " |",
        "|---|" + "---|---|" * len(metrics),
    ]
    for method in methods:
        cells = []
        for m in metrics:
            r = by.get((method, m))
            cells.append(_cell(r["mean"], r["ci_low"], r["ci_high"], digits[m]) if r else "")
            cells.append(
                _cell(r["diff_vs_base"], r["diff_ci_low"], r["diff_ci_high"], digits[m])
                if r and "diff_vs_base" in r
                else ""
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    n = {r["n_prompts"] for r in rows}
    lines += ["", f"Prompts per cell: {', '.join(map(str, sorted(n)))}.", ""]
    if paper:
        table = PAPER_TABLES[paper]
        lines += [
            f"## The paper's numbers: {table['source']}",
            "",
            "| method | " + " | ".join(metric_defs.LABELS[m] for m in table["metrics"]) + " |",
            "|---|" + "---|" * len(table["metrics"]),
        ]
        lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in table["rows"].items()]
        note = (
            "mean ± standard error over three draws of 3k prompts"
            if paper.startswith("mole")
            else "mean over 15 identities x 40 prompts x 4 images"
        )
        lines += ["", f"The paper's figures are the {note}; compare means, not interval widths.", ""]
    lines += ["Per-prompt differences from base: report_differences.png.", ""]
    return "\n".join(lines)


def plot(scores: list[dict], path: Path) -> Path | None:
    """Sorted per-prompt differences (method - base) per metric, with zero and the mean marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    table = per_prompt(scores)
    metrics = [
        m for m in metric_defs.LOADERS if (m, "base") in table and any(k[0] == m and k[1] != "base" for k in table)
    ]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        base = table[(metric, "base")]
        for (m, method), values in sorted(table.items()):
            if m != metric or method == "base":
                continue
            diffs = sorted(values[p] - base[p] for p in set(values) & set(base))
            line = ax.plot(
                range(len(diffs)), diffs, marker=".", label=f"{method} (mean {sum(diffs) / len(diffs):+.3g})"
            )
            ax.axhline(sum(diffs) / len(diffs), color=line[0].get_color(), linestyle="--", linewidth=0.8)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{metric_defs.LABELS[metric]}: method - base")
        ax.set_xlabel("prompts, sorted by difference")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run: Path, paper: str | None = None) -> dict:
    run = Path(run)
    scores = read_scores(run)
    rows = summarize(scores)
    with (run / "report.csv").open("w", newline="") as f:
        fields = [
            "method",
            "metric",
            "label",
            "n_prompts",
            "mean",
            "ci_low",
            "ci_high",
            "diff_vs_base",
            "diff_ci_low",
            "diff_ci_high",
        ]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (run / "report.md").write_text(markdown(rows, paper, run))
    figure = plot(scores, run / "report_differences.png")
    return {"rows": rows, "markdown": run / "report.md", "csv": run / "report.csv", "plot": figure}


def add_arguments(parser):
    parser.add_argument("run", type=Path, help="a scored run folder")
    parser.add_argument("--paper", choices=sorted(PAPER_TABLES), default=None, help="quote this table of the papers")


def main(args):
    try:
        out = write_report(args.run, args.paper)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    print(out["markdown"].read_text())
    print(json.dumps({k: str(v) for k, v in out.items() if k != "rows"}))
