#!/usr/bin/env bash
# Installs this pack into the ComfyUI at $COMFYUI_PATH (default ~/comfy/ComfyUI) and starts
# ComfyUI with it on 127.0.0.1:8188. Extra arguments go to ComfyUI's main.py.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
host=${COMFYUI_PATH:-$HOME/comfy/ComfyUI}
[ -f "$host/main.py" ] || { echo "No ComfyUI at $host: set COMFYUI_PATH (see README, 'Install')." >&2; exit 2; }
target="$host/custom_nodes/ComfyUI-MoLE-MoA"
if [ ! -e "$target" ]; then
  ln -s "$repo" "$target"
  echo "linked $target -> $repo"
fi
# Lets `python3 -m workflows.run` and the tests find this ComfyUI from the checkout (tests/hostenv.py).
(cd "$host" && pwd) > "$repo/.comfyui_host"
python3 -m pip install -q -r "$repo/requirements.txt" 2>&1 | grep -v "running pip as the 'root'" || true
mkdir -p "$host/models/mole" "$host/models/moa"
extra=()
# --cpu only without an accelerator: CUDA/ROCm, or Apple's MPS (which ComfyUI picks by itself).
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() or torch.backends.mps.is_available() else 1)" \
  || extra+=(--cpu)
cd "$host"
exec python3 main.py --listen 127.0.0.1 --port 8188 "${extra[@]}" "$@"
