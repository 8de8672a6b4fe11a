"""Prompt-set builders on the shipped samples (quality/samples): the MoLE paper's filters
(human words; DiffusionDB's NSFW indicator and special symbols), source ids, the draw, and the
MoA / FastComposer single-subject protocol."""

from __future__ import annotations

import json
import subprocess
import sys

import hostenv
import pytest

from quality import moa_protocol
from quality import prompts as ps

SAMPLES = hostenv.REPO / "quality" / "samples"


def test_coco_human_prompts_keep_human_captions_once_with_their_ids():
    rows = ps.coco_human_prompts(SAMPLES / "coco_captions_sample.json")
    assert [r["source_id"] for r in rows] == [101, 103, 106, 107, 109, 111, 112, 114, 116]
    # 102 (a surfer), 105 (food), 110 ("mango"), 108/113/115: no human word; 104: 103 again (spaces, no period)
    assert rows[1] == {
        "id": "coco-103",
        "prompt": "Two women sitting on a bench eating sandwiches.",
        "source": "coco-captions",
        "source_id": 103,
        "image_id": 9002,
    }
    assert "A BOY and his father playing frisbee." in [r["prompt"] for r in rows]  # any case


def test_diffusiondb_filters_nsfw_special_symbols_and_non_human(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    lines = [json.loads(line) for line in (SAMPLES / "diffusiondb_metadata_sample.jsonl").read_text().splitlines()]
    parquet = tmp_path / "metadata.parquet"  # DiffusionDB's own format
    pq.write_table(pa.Table.from_pylist(lines), parquet)
    for source in (parquet, SAMPLES / "diffusiondb_metadata_sample.jsonl"):
        rows = ps.diffusiondb_human_prompts(source)
        assert [r["source_id"] for r in rows] == ["a1b2-0001.png", "a1b2-0002.png", "a1b2-0007.png", "a1b2-0010.png"]
    # 0003 "(...)", 0005 "[...]", 0008 "{...}", 0011 "|": special symbols; 0006: prompt_nsfw 0.91;
    # 0013: no NSFW score; 0009: 0002 again; 0004, 0012: no human word.
    assert [r["id"] for r in ps.diffusiondb_human_prompts(parquet, nsfw_threshold=0.95, special="")][:4] == [
        "diffusiondb-a1b2-0001",
        "diffusiondb-a1b2-0002",
        "diffusiondb-a1b2-0003",
        "diffusiondb-a1b2-0005",
    ]


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "captions.json"
    bad.write_text('{"images": []}')
    with pytest.raises(ps.PromptSetError, match="captions.json: not a COCO captions file"):
        ps.coco_human_prompts(bad)
    table = tmp_path / "meta.jsonl"
    table.write_text('{"image_name": "x.png", "prompt": "a man"}\n')
    with pytest.raises(ps.PromptSetError, match=r"meta.jsonl: row 1 has no \['prompt_nsfw'\]"):
        ps.diffusiondb_human_prompts(table)
    twice = tmp_path / "set.jsonl"
    twice.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(ps.PromptSetError, match="set.jsonl:2: id 'a' appears twice"):
        ps.read_jsonl(twice)


def test_sample_is_seeded_and_the_command_writes_jsonl(tmp_path):
    rows = ps.coco_human_prompts(SAMPLES / "coco_captions_sample.json")
    a, b, c = ps.sample(rows, 4, 0), ps.sample(rows, 4, 0), ps.sample(rows, 4, 1)
    assert a == b and a != c and len(a) == 4 and all(r in rows for r in a)
    out = tmp_path / "coco_human.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "quality",
            "prompts",
            "coco",
            SAMPLES / "coco_captions_sample.json",
            "--out",
            out,
            "--sample",
            "4",
            "--seed",
            "0",
        ],
        cwd=hostenv.REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert ps.read_jsonl(out) == a
    assert "9 human-centric prompts; 4 written" in done.stdout


def test_moa_protocol_is_fastcomposers(tmp_path):
    rows = moa_protocol.single_subject_prompts()
    assert len(rows) == 15 * 40 and len(moa_protocol.IDENTITIES) == 15
    # FastComposer's file names: subject_{case:04d}_prompt_{prompt:04d}, identities in sorted order.
    assert rows[0] == {
        "id": "subject_0000_prompt_0000",
        "prompt": "a man wearing a red hat",
        "source": "fastcomposer-single-subject",
        "source_id": "000001/0",
        "subject": "000001",
        "subject_word": "man",
    }
    assert rows[40 * 3 + 39]["prompt"] == "a woman on top of a purple rug in a forest"  # 000612, last context prompt
    assert rows[40 * 3 + 39]["subject"] == "000612"
    for identity in ("000001", "000612"):
        (tmp_path / identity).mkdir()
    (tmp_path / "000001" / "b.jpg").write_bytes(b"")
    (tmp_path / "000001" / "a.jpg").write_bytes(b"")
    assert moa_protocol.reference_image(tmp_path, "000001").name == "a.jpg"
    with pytest.raises(ps.PromptSetError, match="000612: no reference image"):
        moa_protocol.reference_image(tmp_path, "000612")
