"""The pack's model folders (models/mole, models/moa), registered with ComfyUI's folder_paths."""

from __future__ import annotations

import os

import folder_paths

from ..mixture_core.safetensors_io import load_safetensors

# The extensions each folder lists: models/moa also takes FastComposer's published pytorch_model.bin
# (read with torch.load(weights_only=True), only in FastComposer's layout: nodes/moa_loading.py).
PACK_FOLDERS = {"mole": (".safetensors",), "moa": (".safetensors", ".bin")}


def register_model_folders() -> None:
    """Add models/<name> as the default path of each pack folder. Paths an
    extra_model_paths.yaml gave the same folder name before the pack loaded are kept."""
    for name, wanted in PACK_FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)
        _, extensions = folder_paths.folder_names_and_paths[name]
        extensions.update(wanted)


# At import: node schemas list these folders as soon as ComfyUI loads the pack.
register_model_folders()


def files_in(folder: str) -> list[str]:
    return folder_paths.get_filename_list(folder)


def safetensors_in(folder: str) -> list[str]:
    """The files of a folder the pack can read: only .safetensors (pickles are refused, since
    loading one can run code), so lists do not offer files that would fail at run time."""
    return [name for name in files_in(folder) if name.lower().endswith(".safetensors")]


def file_fingerprint(folder: str, *names) -> tuple:
    """(name, size, mtime) of each named file: the value a loader's fingerprint_inputs (V3's
    IS_CHANGED) returns, so a file overwritten under the same name is read again on the next run."""
    out = []
    for name in names:
        path = folder_paths.get_full_path(folder, name) if isinstance(name, str) else None
        stat = os.stat(path) if path else None
        out.append((name, stat.st_size, stat.st_mtime_ns) if stat else (name, None, None))
    return tuple(out)


def full_path(folder: str, filename: str) -> str:
    """The path of a file picked in a node's list, or a clear error naming the folders searched."""
    path = folder_paths.get_full_path(folder, filename)
    if path is None:
        searched = ", ".join(folder_paths.get_folder_paths(folder))
        raise FileNotFoundError(f"{filename}: not found in the '{folder}' model folders ({searched})")
    return path


def load_from_folder(folder: str, filename: str, check_layout=None):
    """(path, tensors, metadata) of a safetensors file in a model folder; check_layout(layout,
    metadata, path) runs on its names and shapes before its tensors are read."""
    path = full_path(folder, filename)
    check = None if check_layout is None else lambda layout, metadata: check_layout(layout, metadata, path)
    tensors, metadata = load_safetensors(path, check_layout=check)
    return path, tensors, metadata
