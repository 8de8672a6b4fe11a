#!/usr/bin/env bash
# The whole test suite: installs what the tests need, then runs pytest. Host tests find
# ComfyUI through COMFYUI_PATH, the ComfyUI holding this pack, or ~/comfy/ComfyUI, and are
# skipped with the reason printed when there is none. Arguments go to pytest.
#
#   scripts/test.sh            everything (what .ci/run runs)
#   scripts/test.sh --fast     the edit loop: core tests and the quick host tests, the tests
#                              marked `slow` (over ~5 s each on 2 CPU cores) left out
#
# Two pytest-xdist workers ($TEST_WORKERS; `-n 0` after the script runs in one process): each
# module runs whole on one worker, and the modules sharing a costly fixture on the same one
# (tests/conftest.py). Peak memory with two workers: 15-18 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements-dev.txt 2>&1 | grep -vi "running pip as the 'root'\|is ignored" || true
# Without their dependencies: their pins (torch<2.3, timm==0.6.13) would replace the host's packages.
python3 -m pip install -q --no-deps facenet-pytorch==2.6.0 image-reward==1.5 2>&1 | grep -vi "running pip as the 'root'\|is ignored" || true
# One line naming what the suite ran against (a failure elsewhere is first compared on these).
python3 - <<'VERSIONS' || true
import importlib.metadata as md, runpy, torch
from comfyui_host import find_host
host, _ = find_host()
comfy = runpy.run_path(str(host / "comfyui_version.py"))["__version__"] if host else "none"
try:
    frontend = md.version("comfyui-frontend-package")
except md.PackageNotFoundError:
    frontend = "none"
print(f"versions: torch {torch.__version__}, ComfyUI {comfy} ({host}), frontend {frontend}")
VERSIONS
args=(-p no:benchmark -n "${TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder)
for arg in "$@"; do
    if [[ "$arg" == "--fast" ]]; then
        args+=(-m "not slow")
    else
        args+=("$arg")
    fi
done
exec python3 -m pytest "${args[@]}"
