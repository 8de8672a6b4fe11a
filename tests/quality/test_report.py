"""The report: 95% t-intervals over prompts (seeds averaged first), paired differences from
base, the Markdown and CSV tables in the papers' units beside the papers' numbers, the plot."""

from __future__ import annotations

import csv
import math

import pytest

from quality import report


def scores_csv(path, rows):
    with (path / "scores.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "method", "seed", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)


def test_interval_is_a_t_interval():
    mean, low, high = report.interval([1.0, 2.0, 3.0, 4.0])
    # sd = 1.2910, t(0.975, 3) = 3.1824: half width 2.0543
    assert (
        mean == 2.5 and low == pytest.approx(2.5 - 2.0543, abs=1e-4) and high == pytest.approx(2.5 + 2.0543, abs=1e-4)
    )
    assert math.isnan(report.interval([5.0])[1])


def test_summary_averages_seeds_then_prompts_and_pairs_with_base(tmp_path):
    rows = []
    for pid, base, mole in (("p1", 0.20, 0.21), ("p2", 0.19, 0.22), ("p3", 0.18, 0.18)):
        for seed, jitter in ((0, -0.01), (1, 0.01)):
            rows.append({"id": pid, "method": "base", "seed": seed, "metric": "hps", "value": base + jitter})
            rows.append({"id": pid, "method": "mole", "seed": seed, "metric": "hps", "value": mole + jitter})
    rows.append({"id": "p1", "method": "mole", "seed": 0, "metric": "clip", "value": 0.25})
    scores_csv(tmp_path, rows)
    out = report.write_report(tmp_path, paper="mole-coco")
    by = {(r["method"], r["metric"]): r for r in out["rows"]}
    assert by[("base", "hps")]["mean"] == pytest.approx(19.0) and by[("base", "hps")]["n_prompts"] == 3  # in %
    assert by[("mole", "hps")]["mean"] == pytest.approx(61 / 3)
    diff = by[("mole", "hps")]
    assert diff["diff_vs_base"] == pytest.approx(4 / 3)  # (1 + 3 + 0) / 3, in %
    half = report.t_quantile(2) * math.sqrt(((1 - 4 / 3) ** 2 + (3 - 4 / 3) ** 2 + (4 / 3) ** 2) / 2) / math.sqrt(3)
    assert diff["diff_ci_high"] - diff["diff_vs_base"] == pytest.approx(half)
    assert "diff_vs_base" not in by[("mole", "clip")]  # base has no clip score
    md = out["markdown"].read_text()
    assert "| mole | 20.33 [" in md and "Δ HPS (%)" in md
    assert "MoLE paper, Tab. 1 (COCO Human Prompts)" in md and "| MoLE | 20.27 ± 0.07 | 33.75 ± 1.49 |" in md
    with out["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert {(r["method"], r["metric"]) for r in table} == {("base", "hps"), ("mole", "hps"), ("mole", "clip")}
    if out["plot"] is not None:  # matplotlib is in the quality extra
        assert out["plot"].stat().st_size > 1000


def test_report_without_scores_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="quality score"):
        report.write_report(tmp_path)
