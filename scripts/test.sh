#!/usr/bin/env bash
# The whole test suite: installs what the tests need, then runs pytest. Host tests find
# ComfyUI through COMFYUI_PATH, the ComfyUI holding this pack, or ~/comfy/ComfyUI, and are
# skipped with the reason printed when there is none. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements-dev.txt 2>&1 | grep -vi "running pip as the 'root'\|is ignored" || true
# Without their dependencies: their pins (torch<2.3, timm==0.6.13) would replace the host's packages.
python3 -m pip install -q --no-deps facenet-pytorch==2.6.0 image-reward==1.5 2>&1 | grep -vi "running pip as the 'root'\|is ignored" || true
exec python3 -m pytest "$@"
