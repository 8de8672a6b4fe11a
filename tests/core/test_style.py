"""The code is formatted and linted as pyproject.toml's [tool.ruff] says (`ruff format`, `ruff check`)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import comfyui_host

RUFF = shutil.which("ruff")


@pytest.mark.skipif(RUFF is None, reason="ruff is not installed (pip install -r requirements-dev.txt)")
@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_ruff(command):
    done = subprocess.run([RUFF, *command, "."], cwd=comfyui_host.REPO, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"ruff {' '.join(command)} found problems (run `ruff format . && ruff check --fix .`):\n"
        + (done.stdout + done.stderr)[-4000:]
    )
