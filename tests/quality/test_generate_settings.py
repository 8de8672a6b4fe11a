"""The generation runner's checks that come before ComfyUI starts: method arguments, a run folder
holding other settings, MoA prompts without a subject, the graph each (prompt, seed) becomes.
(Rendering itself: tests/host/test_quality_host.py.)"""

from __future__ import annotations

import argparse

import pytest

from quality import generate, moa_protocol


def settings(*argv):
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return generate.settings_from_args(
        parser.parse_args(["set.jsonl", "--out", "run", "--checkpoint", "c.safetensors", *argv])
    )


def test_methods_need_their_files():
    with pytest.raises(generate.GenerateError, match="MoLE method needs --mole-expert"):
        settings("--method", "mole")
    with pytest.raises(generate.GenerateError, match="expected FILE=NAME"):
        settings("--method", "mole", "--mole-expert", "face.safetensors", "--mole-gates", "g.safetensors")
    with pytest.raises(generate.GenerateError, match="moa method needs --moa FILE, --clip-vision FILE"):
        settings("--method", "moa", "--moa", "m.safetensors")


def test_one_graph_per_prompt_and_seed_holds_every_method():
    s = settings(
        "--method",
        "base",
        "--method",
        "mole-global",
        "--method",
        "moa",
        "--mole-expert",
        "f.safetensors=face:0.8",
        "--mole-gates",
        "g.safetensors",
        "--moa",
        "m.safetensors",
        "--clip-vision",
        "v.safetensors",
        "--reference-dir",
        ".",
        "--sampler",
        "uni_pc",
        "--seeds",
        "5",
    )
    item = moa_protocol.single_subject_prompts()[0]
    nodes, saves = generate.build_graph(item, 5, s["methods"], s, "subject_000001.jpg")
    assert sorted(saves.values()) == ["base", "moa", "mole-global"]
    samplers = [n["inputs"] for n in nodes.values() if n["class_type"] == "KSampler"]
    assert len(samplers) == 3 and {(k["seed"], k["sampler_name"]) for k in samplers} == {(5, "uni_pc")}
    kinds = {n["class_type"]: n["inputs"] for n in nodes.values()}
    assert kinds["MoLE_ApplyGating"]["mode"] == "global" and kinds["MoLE_LoadExperts"]["strength_1"] == 0.8
    assert kinds["MoLE_LoadExperts"]["expert_2"] == "None"  # one expert
    assert kinds["MoA_SubjectInject"]["subject_words"] == "man" and kinds["LoadImage"]["image"] == "subject_000001.jpg"
    assert sum(n["class_type"] == "CheckpointLoaderSimple" for n in nodes.values()) == 1


def test_a_run_folder_with_other_settings_is_refused(tmp_path):
    first = settings("--steps", "30")
    generate._check_settings(tmp_path, first, tmp_path / "set.jsonl")
    generate._check_settings(tmp_path, settings("--steps", "30", "--seeds", "1"), tmp_path / "set.jsonl")  # more seeds
    with pytest.raises(generate.GenerateError, match=r"other settings \(cfg, steps differ"):
        generate._check_settings(tmp_path, settings("--steps", "20", "--cfg", "5"), tmp_path / "set.jsonl")


def test_moa_prompts_need_a_subject(tmp_path):
    s = settings("--method", "moa", "--moa", "m", "--clip-vision", "v", "--reference-dir", str(tmp_path))
    with pytest.raises(generate.GenerateError, match="prompt p1: the moa method needs prompts with a 'subject'"):
        generate._stage_references([{"id": "p1", "prompt": "a man"}], s, tmp_path / "inputs")
