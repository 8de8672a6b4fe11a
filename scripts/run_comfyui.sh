#!/usr/bin/env bash
# Installs this pack into the ComfyUI at $COMFYUI_PATH (default ~/comfy/ComfyUI) and starts
# ComfyUI with it on 127.0.0.1:8188. Extra arguments go to ComfyUI's main.py (`--port 8190`
# replaces the port: the last one given wins).
#
# It runs ComfyUI's own Python, whether or not its venv is active: $COMFYUI_PYTHON when set, else
# the venv in the ComfyUI folder (venv/ or .venv/), else python3 from PATH. The one chosen must
# import torch (ComfyUI's requirements); otherwise it stops and says what to do, before touching
# anything.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
host=${COMFYUI_PATH:-$HOME/comfy/ComfyUI}
[ -f "$host/main.py" ] || { echo "No ComfyUI at $host: set COMFYUI_PATH (see README, 'Install')." >&2; exit 2; }

python=${COMFYUI_PYTHON:-}
origin="COMFYUI_PYTHON"
if [ -z "$python" ]; then
  for candidate in "$host/venv/bin/python" "$host/.venv/bin/python" "$host/venv/Scripts/python.exe" \
    "$host/.venv/Scripts/python.exe"; do
    if [ -x "$candidate" ]; then python=$candidate origin="ComfyUI's venv"; break; fi
  done
fi
if [ -z "$python" ]; then python=$(command -v python3 || echo python3) origin="python3 on PATH"; fi
if ! command -v "$python" >/dev/null; then
  echo "run_comfyui.sh: no Python at $python ($origin): set COMFYUI_PYTHON to the Python that runs ComfyUI." >&2
  exit 3
fi
if ! "$python" -c "import torch" >/dev/null 2>&1; then
  echo "run_comfyui.sh: $python ($origin) cannot import torch: install ComfyUI's requirements into it" \
    "(pip install -r $host/requirements.txt, torch as ComfyUI's README says) or set COMFYUI_PYTHON to the" \
    "Python that runs ComfyUI." >&2
  exit 3
fi

target="$host/custom_nodes/ComfyUI-MoLE-MoA"
if [ ! -e "$target" ]; then
  ln -s "$repo" "$target"
  echo "linked $target -> $repo"
fi
# Lets `python3 -m workflows.run` and the tests find this ComfyUI from the checkout (tests/hostenv.py).
(cd "$host" && pwd) > "$repo/.comfyui_host"
# The pack's requirements, into that same Python, only when missing (no network on later starts).
if ! "$python" -c "import einops, safetensors" >/dev/null 2>&1; then
  "$python" -m pip install -q -r "$repo/requirements.txt" 2>&1 | grep -v "running pip as the 'root'" || true
  "$python" -c "import einops, safetensors" >/dev/null 2>&1 || {
    echo "run_comfyui.sh: could not install $repo/requirements.txt into $python: install it with that Python's pip." >&2
    exit 3
  }
fi
mkdir -p "$host/models/mole" "$host/models/moa"
extra=()
# --cpu only without an accelerator: CUDA/ROCm, or Apple's MPS (which ComfyUI picks by itself).
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or torch.backends.mps.is_available() else 1)" \
  || extra+=(--cpu)
cd "$host"
echo "starting ComfyUI with $python ($origin)"
# ${extra[@]+...}: an empty array under `set -u` is an error in macOS's bash 3.2
exec "$python" main.py --listen 127.0.0.1 --port 8188 ${extra[@]+"${extra[@]}"} "$@"
