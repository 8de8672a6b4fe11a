"""scripts/run_comfyui.sh picks ComfyUI's own Python (its venv, else COMFYUI_PYTHON, else python3)
and, when that Python has no torch, stops with one line saying what to do, before it links,
records or installs anything. Fake ComfyUI folders with real venvs that lack torch; nothing starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "run_comfyui.sh"
pytestmark = pytest.mark.skipif(sys.platform == "win32" or not shutil.which("bash"), reason="needs bash")


def _no_torch_python(folder: Path) -> Path:
    """A real Python without torch: a venv without pip and without the system site-packages."""
    venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=True).create(folder)
    python = folder / "bin" / "python"
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    return python


def _fake_comfyui(root: Path) -> Path:
    host = root / "ComfyUI"
    (host / "custom_nodes").mkdir(parents=True)
    (host / "main.py").write_text("raise SystemExit('the script must not get this far')\n")
    return host


def _run(env_changes: dict[str, str], path_first: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PYTHON", "VIRTUAL_ENV")} | env_changes
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)


def _assert_stopped_cleanly(result: subprocess.CompletedProcess, host: Path, python: Path, origin: str) -> None:
    assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback, no pip output
    assert str(python) in lines[0] and origin in lines[0] and "cannot import torch" in lines[0]
    assert "COMFYUI_PYTHON" in lines[0] and "requirements.txt" in lines[0]
    assert list((host / "custom_nodes").iterdir()) == [], "linked the pack before checking the Python"
    assert not (host / "models").exists()


def test_comfyuis_venv_is_used_even_when_python3_has_torch(tmp_path):
    host = _fake_comfyui(tmp_path)
    python = _no_torch_python(host / "venv")
    record = (REPO / ".comfyui_host").read_text() if (REPO / ".comfyui_host").exists() else None
    result = _run({"COMFYUI_PATH": str(host)})  # python3 on PATH is the one with torch
    _assert_stopped_cleanly(result, host, python, "ComfyUI's venv")
    assert ((REPO / ".comfyui_host").read_text() if (REPO / ".comfyui_host").exists() else None) == record


def test_comfyui_python_wins_over_the_venv(tmp_path):
    host = _fake_comfyui(tmp_path)
    decoy = host / ".venv" / "bin" / "python"  # ComfyUI's venv, which COMFYUI_PYTHON overrides
    decoy.parent.mkdir(parents=True)
    decoy.write_text("#!/bin/sh\nexit 1\n")
    decoy.chmod(0o755)
    python = _no_torch_python(tmp_path / "other")
    result = _run({"COMFYUI_PATH": str(host), "COMFYUI_PYTHON": str(python)})
    _assert_stopped_cleanly(result, host, python, "COMFYUI_PYTHON")


def test_python3_from_path_without_torch_is_refused(tmp_path):
    host = _fake_comfyui(tmp_path)
    python = _no_torch_python(tmp_path / "env")
    result = _run({"COMFYUI_PATH": str(host)}, path_first=python.parent)
    _assert_stopped_cleanly(result, host, python.parent / "python3", "python3 on PATH")
