"""quality/processes.py without launching anything: each process's share, where it writes, and the
merge of the process manifests into the run's one manifest. (Two real processes rendering:
tests/host/test_quality_host.py.)"""

from __future__ import annotations

import json

from quality import processes


def rows(*keys):
    return [{"id": i, "seed": s, "method": m, "image": f"images/{m}/{i}_s{s}.png"} for i, s, m in keys]


def write(path, items, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in items) + tail)


def test_shares_cover_every_pair_once_and_each_process_writes_its_own_files(tmp_path):
    pairs = list(range(7))
    shares = [processes.share(pairs, processes.Processes(i, 3)) for i in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert processes.share(pairs, processes.Processes()) == pairs
    assert processes.manifest_path(tmp_path, processes.Processes()) == tmp_path / "manifest.jsonl"
    paths = {processes.manifest_path(tmp_path, processes.Processes(i, 2)) for i in range(2)}
    renders = {processes.render_dir(tmp_path, processes.Processes(i, 2)) for i in range(2)}
    assert len(paths) == 2 and len(renders) == 2 and tmp_path / "manifest.jsonl" not in paths
    assert processes.Processes(1, 2).label() == "process 1 of 2: " and processes.Processes().label() == ""


def test_merge_appends_new_rows_in_one_process_order_once_and_removes_the_parts(tmp_path):
    write(tmp_path / "manifest.jsonl", rows(("b", 0, "base")))  # from an earlier run: stays first
    write(tmp_path / "manifest.process0.jsonl", rows(("a", 0, "base"), ("a", 0, "mole"), ("b", 0, "base")))
    # process 1 was killed while writing its last line
    write(tmp_path / "manifest.process1.jsonl", rows(("a", 1, "base")), tail='{"id": "a", "se')
    assert len(processes.read_all(tmp_path)) == 5
    order = {"a": 0, "b": 1}
    merged = processes.merge(tmp_path, lambda r: (order[r["id"]], r["seed"], r["method"] != "base"))
    keys = [(r["id"], r["seed"], r["method"]) for r in merged]
    assert keys == [("b", 0, "base"), ("a", 0, "base"), ("a", 0, "mole"), ("a", 1, "base")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]
    on_disk = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert on_disk == merged
    assert processes.merge(tmp_path, lambda r: 0) == merged  # nothing left to merge: unchanged
