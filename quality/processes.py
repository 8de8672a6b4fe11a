"""`quality generate` spread over processes: `accelerate launch -m quality generate ...` (or torchrun).

Each process renders a fixed share of the (prompt, seed) pairs (pair i goes to process
i mod N: a function of the prompt set and seeds only, so a rerun with the same N gives every
process the same share and resumes it), on its own GPU (Accelerate's PartialState sets the
device of LOCAL_RANK before ComfyUI picks its device). Race-free by ownership: process k alone
appends to RUN/manifest.process<k>.jsonl and renders into RUN/_render/process<k>; the main
process alone writes run.json, copies the reference images, and, once every process has
finished, merges the process manifests into RUN/manifest.jsonl (atomically, in the order one
process would have written) and deletes them. A stopped run leaves the process manifests; the
next run (with any number of processes) reads them as done and merges them at its end.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path

MANIFEST = "manifest.jsonl"
PROCESS_MANIFESTS = "manifest.process*.jsonl"


@dataclasses.dataclass
class Processes:
    index: int = 0
    count: int = 1
    state: object = None  # accelerate's PartialState when launched as several processes

    @property
    def main(self) -> bool:
        return self.index == 0

    def wait(self) -> None:
        """Barrier: every process gets here before any goes on (no-op for one process)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def label(self) -> str:
        return f"process {self.index} of {self.count}: " if self.count > 1 else ""


def processes() -> Processes:
    """This process's place in a launch (accelerate launch / torchrun set WORLD_SIZE, RANK,
    LOCAL_RANK); one process without a launcher. Call before ComfyUI is imported: its device is
    the current CUDA device when it is imported, which PartialState sets to this process's GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    import torch

    try:
        from accelerate import PartialState
    except ImportError as e:
        raise SystemExit("error: generating with several processes needs Accelerate (pip install accelerate)") from e
    # Without CUDA: CPU processes over gloo (how the tests run two processes on one machine).
    # A process whose share is done waits at the end for the others, for as long as theirs take
    # (a resumed run can leave one process most of the work): no collective timeout.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(days=7))
    return Processes(state.process_index, state.num_processes, state)


def share(pairs: list, procs: Processes) -> list:
    return pairs[procs.index :: procs.count]


def manifest_path(out: Path, procs: Processes) -> Path:
    """Where this process appends its rows: the run's manifest for one process."""
    return out / (MANIFEST if procs.count == 1 else f"manifest.process{procs.index}.jsonl")


def render_dir(out: Path, procs: Processes) -> Path:
    return out / "_render" if procs.count == 1 else out / "_render" / f"process{procs.index}"


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):  # only the last line may be cut (a process killed while writing it)
                raise ValueError(f"{path}: line {number} is not JSON") from None
    return rows


def read_all(out: Path) -> list[dict]:
    """The run's manifest and every process manifest not merged yet (read only)."""
    rows = _rows(out / MANIFEST)
    for path in sorted(out.glob(PROCESS_MANIFESTS)):
        rows += _rows(path)
    return rows


def merge(out: Path, order) -> list[dict]:
    """(Main process, after every process finished.) The process manifests appended to the run's
    manifest, one row per (id, seed, method), new rows sorted by `order(row)`; written to a
    temporary file and renamed, then the process manifests are deleted."""
    parts = sorted(out.glob(PROCESS_MANIFESTS))
    rows = _rows(out / MANIFEST)
    if not parts:
        return rows
    seen = {(r["id"], r["seed"], r["method"]) for r in rows}
    new = []
    for path in parts:
        for row in _rows(path):
            key = (row["id"], row["seed"], row["method"])
            if key not in seen:
                seen.add(key)
                new.append(row)
    rows += sorted(new, key=order)
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, out / MANIFEST)
    for path in parts:
        path.unlink()
    return rows
