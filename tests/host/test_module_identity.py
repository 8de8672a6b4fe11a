"""One module object per file of this repository in a process that loads the pack as ComfyUI does
and the training scripts' modules: two copies of mixture_core (the top-level package and the pack's
subpackage) would make a class made by training a stranger to the nodes' isinstance checks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import hostenv
import pytest


@pytest.mark.slow
def test_one_module_object_per_file(tmp_path):
    link = tmp_path / "custom_nodes" / "ComfyUI-MoLE-MoA"
    link.parent.mkdir()
    link.symlink_to(hostenv.REPO, target_is_directory=True)
    script = textwrap.dedent(f"""
        import asyncio, collections, importlib, json, sys
        from pathlib import Path
        sys.path.insert(0, {str(hostenv.REPO / "tests")!r})
        import hostenv; hostenv.import_host()
        import nodes
        assert asyncio.run(nodes.load_custom_node({str(link)!r}))  # as ComfyUI loads custom_nodes/
        import training.mole_gates, training.moa_train, mixture_core.mole  # the repository root is on sys.path
        pack = hostenv.import_pack()  # the training scripts' way to the node-side helpers
        mole_nodes = importlib.import_module(pack.__name__ + ".nodes.mole_nodes")
        by_file = collections.defaultdict(set)
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if file and Path(file).resolve().is_relative_to(hostenv.REPO):
                by_file[str(Path(file).resolve().relative_to(hostenv.REPO))].add(id(module))
        print(json.dumps({{
            "copies": {{f: len(ids) for f, ids in by_file.items() if len(ids) > 1}},
            "core_files": sorted(f for f in by_file if f.startswith("mixture_core")),
            "pack_is_comfyui_s": pack.__name__ == {str(link)!r}.replace(".", "_x_"),
            "same_class": mole_nodes.MoLEForward is mixture_core.mole.MoLEForward,
        }}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "mixture_core/mole.py" in result["core_files"] and "mixture_core/__init__.py" in result["core_files"]
    assert result["copies"] == {}
    assert result["pack_is_comfyui_s"] and result["same_class"]
