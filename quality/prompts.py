"""Prompt sets, as the MoLE paper built its two human-centric benchmarks (MoLE paper, Sec. 4.1):

  "Benchmark 1: COCO Human Prompts. [...] we use the captions in the COCO val set, and preserve
   the caption that contains human-related words, e.g., woman, man, kid, girl, boy, person,
   teenager, etc. In the end, we have around 60k prompts left"
  "Benchmark 2: DiffusionDB Human Prompts. [...] DiffusionDB 2M set [...] we first filter out the
   NSFW prompts by the indicator provided in DiffusionDB. Then we preserve captions containing
   human-related words. Additionally, we filter out prompts containing special symbol, e.g.,
   [,], {, }, etc. In the end, we have around 64k prompts left"
  (Sec. 4.2) "we randomly sample 3k prompts from [each] benchmark [...] We repeat the process
   three times"

What the paper leaves open, and the choice made here (each can be changed on the command line):
the word list past its examples (HUMAN_WORDS: the examples, their plurals and near synonyms),
the "special symbols" past [ ] { } (SPECIAL: also the other prompt-weighting brackets ( ) < > and
| \\), the NSFW threshold (DiffusionDB's prompt_nsfw score, 0..1: kept below 0.5), and
duplicates (identical prompts are kept once, with the first source id).

A prompt set is JSON lines: {"id", "prompt", "source", "source_id"} (+ "image_id" for COCO).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from pathlib import Path

HUMAN_WORDS = (
    "man",
    "men",
    "woman",
    "women",
    "person",
    "persons",
    "people",
    "kid",
    "kids",
    "child",
    "children",
    "girl",
    "girls",
    "boy",
    "boys",
    "teenager",
    "teenagers",
    "teen",
    "teens",
    "lady",
    "ladies",
    "guy",
    "guys",
    "gentleman",
    "gentlemen",
    "baby",
    "babies",
    "toddler",
    "toddlers",
    "adult",
    "adults",
)
SPECIAL = "[]{}()<>|\\"
NSFW_THRESHOLD = 0.5


class PromptSetError(ValueError):
    pass


def human_pattern(words=HUMAN_WORDS) -> re.Pattern:
    """Whole words only, any case: "man" matches "A man rides" and "the man's hat", not "mango" or "human"."""
    return re.compile(
        r"\b(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b", re.IGNORECASE
    )


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def _keep_unique(rows):
    seen, out = set(), []
    for row in rows:
        key = row["prompt"].lower().rstrip(" .")
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def coco_human_prompts(captions_json: Path, words=HUMAN_WORDS) -> list[dict]:
    """COCO Human Prompts from a COCO captions file (captions_val2014.json: the paper's "COCO val set")."""
    try:
        data = json.loads(Path(captions_json).read_text())
        annotations = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PromptSetError(
            f"{captions_json}: not a COCO captions file (a JSON with 'annotations': "
            f"[{{'id', 'image_id', 'caption'}}]): {e!r}"
        ) from None
    pattern = human_pattern(words)
    rows = []
    for a in sorted(annotations, key=lambda a: a["id"]):
        caption = _clean(a["caption"])
        if pattern.search(caption):
            rows.append(
                {
                    "id": f"coco-{a['id']}",
                    "prompt": caption,
                    "source": "coco-captions",
                    "source_id": a["id"],
                    "image_id": a["image_id"],
                }
            )
    return _keep_unique(rows)


def _read_table(path: Path, columns: list[str]) -> list[dict]:
    """Rows of DiffusionDB's metadata: its parquet file (needs pyarrow), or the same columns as
    JSON lines or CSV."""
    path = Path(path)
    if not path.is_file():
        raise PromptSetError(f"{path}: no such file (DiffusionDB's metadata.parquet)")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PromptSetError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise PromptSetError(f"{path}: no column(s) {missing} (DiffusionDB metadata has {columns})")
        return table.select(columns).to_pylist()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise PromptSetError(f"{path}: expected DiffusionDB's metadata.parquet (or .jsonl/.csv with its columns)")
    for i, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            raise PromptSetError(f"{path}: row {i + 1} has no {missing}")
    return rows


def diffusiondb_human_prompts(
    metadata: Path, words=HUMAN_WORDS, special: str = SPECIAL, nsfw_threshold: float = NSFW_THRESHOLD
) -> list[dict]:
    """DiffusionDB Human Prompts from DiffusionDB 2M's metadata.parquet (image_name, prompt, prompt_nsfw)."""
    pattern = human_pattern(words)
    rows = []
    for r in _read_table(metadata, ["image_name", "prompt", "prompt_nsfw"]):
        prompt = _clean(r["prompt"] or "")
        nsfw = float(r["prompt_nsfw"]) if r["prompt_nsfw"] not in (None, "") else 1.0  # unscored: not kept
        if not prompt or nsfw >= nsfw_threshold or any(c in prompt for c in special) or not pattern.search(prompt):
            continue
        rows.append(
            {
                "id": f"diffusiondb-{Path(str(r['image_name'])).stem}",
                "prompt": prompt,
                "source": "diffusiondb-2m",
                "source_id": r["image_name"],
            }
        )
    return _keep_unique(rows)


def sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """n prompts drawn at random with `seed` (the paper's 3k per repeat), in source order."""
    if n is None or n >= len(rows):
        return list(rows)
    chosen = set(random.Random(seed).sample(range(len(rows)), n))
    return [row for i, row in enumerate(rows) if i in chosen]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    """A prompt set: every line a JSON object with a unique "id" and a "prompt"."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise PromptSetError(f"{path}: cannot read the prompt set ({e.strerror})") from None
    rows, ids = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PromptSetError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not isinstance(row.get("prompt"), str):
            raise PromptSetError(f"{path}:{n}: a prompt needs a string 'id' and 'prompt'")
        if row["id"] in ids:
            raise PromptSetError(f"{path}:{n}: id {row['id']!r} appears twice")
        ids.add(row["id"])
        rows.append(row)
    if not rows:
        raise PromptSetError(f"{path}: no prompts")
    return rows


def add_arguments(parser: argparse.ArgumentParser):
    sub = parser.add_subparsers(dest="set", required=True)
    coco = sub.add_parser("coco", help="COCO Human Prompts from captions_val2014.json")
    coco.add_argument("captions", type=Path)
    db = sub.add_parser("diffusiondb", help="DiffusionDB Human Prompts from DiffusionDB 2M's metadata.parquet")
    db.add_argument("metadata", type=Path)
    db.add_argument(
        "--nsfw-threshold",
        type=float,
        default=NSFW_THRESHOLD,
        help="drop prompts whose prompt_nsfw score is at least this (default 0.5)",
    )
    for p in (coco, db):
        p.add_argument("--out", type=Path, required=True, help="the prompt set (.jsonl)")
        p.add_argument("--sample", type=int, default=None, help="draw this many at random (the paper: 3000)")
        p.add_argument("--seed", type=int, default=0, help="seed of the draw (one per repeat: 0, 1, 2)")
        p.add_argument(
            "--words", default=None, help="comma-separated human words (default: quality.prompts.HUMAN_WORDS)"
        )


def main(args):
    words = tuple(w.strip() for w in args.words.split(",") if w.strip()) if args.words else HUMAN_WORDS
    if args.set == "coco":
        rows = coco_human_prompts(args.captions, words)
    else:
        rows = diffusiondb_human_prompts(args.metadata, words, nsfw_threshold=args.nsfw_threshold)
    chosen = sample(rows, args.sample, args.seed)
    write_jsonl(chosen, args.out)
    print(f"{len(rows)} human-centric prompts; {len(chosen)} written to {args.out}")
