"""What Load MoA Router reads: a MoA file (.safetensors), or FastComposer's published
pytorch_model.bin put into models/moa as it is downloaded.

The .bin is converted by mixture_core.fastcomposer (the conversion the command
training/convert_fastcomposer.py runs) once; the result is cached beside it, in a
``.moa-cache`` folder of the same model folder, under a key of the source file's identity
(path, size, modification time): the next load, in this run or after a restart, is a
safetensors read. The cache files end in .moa / .clip_vision, so no model list offers them.
The MOA_WEIGHTS value of a .bin carries FastComposer's fine-tuned image encoder, so the graph
needs no second file.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass, field

from ..mixture_core import fastcomposer
from ..mixture_core.errors import WeightFileError
from ..mixture_core.moa import MoAModel
from ..mixture_core.moa_files import load_moa_file, save_moa_file
from .model_folders import files_in, full_path
from .patching import weights_patcher

log = logging.getLogger(__name__)

FASTCOMPOSER_FILE = "pytorch_model.bin"  # the name FastComposer publishes (huggingface.co/mit-han-lab/fastcomposer)
FASTCOMPOSER_URL = "https://huggingface.co/mit-han-lab/fastcomposer"
CACHE_DIR = ".moa-cache"
CACHE_VERSION = "1"  # part of the key: a conversion that writes something else gets new cache files


@dataclass(frozen=True)
class LoadedMoA:
    """The value on a MOA_WEIGHTS wire: the file's weights and their one ModelPatcher, made at
    load and shared by every model MoA Subject Inject patches with them (a patcher per run
    would leave ComfyUI tracking a new handle to the same weights each time: its "memory
    leak" warnings); and the image encoder the file brings (a ComfyUI CLIP vision model), if any."""

    path: str
    model: MoAModel
    patcher: object = field(default=None, compare=False, repr=False)
    clip_vision: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.patcher is None:
            object.__setattr__(self, "patcher", weights_patcher(self.model))

    def __deepcopy__(self, memo):
        # its own patcher over the copied weights; the image encoder is only read: shared
        return LoadedMoA(self.path, copy.deepcopy(self.model, memo), clip_vision=self.clip_vision)


def moa_choices() -> list[str]:
    """The files Load MoA Router offers: MoA files and .bin files (read only when they are
    FastComposer's), none in hidden folders (the cache); FastComposer's pytorch_model.bin first."""
    names = [
        n
        for n in files_in("moa")
        if n.lower().endswith((".safetensors", ".bin"))
        and not any(part.startswith(".") for part in n.replace("\\", "/").split("/")[:-1])
    ]
    return sorted(names, key=lambda n: os.path.basename(n) != FASTCOMPOSER_FILE)


def load_router(filename: str) -> LoadedMoA:
    path = full_path("moa", filename)
    if path.lower().endswith(".bin"):
        return load_fastcomposer(path)
    return LoadedMoA(path, load_moa_file(path))


# ---- FastComposer's pytorch_model.bin --------------------------------------------------------


def cache_paths(path: str) -> tuple[str, str]:
    """(MoA file, image encoder file) of the cache of the source file at `path`."""
    stat = os.stat(path)
    identity = f"{CACHE_VERSION}\0{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    base = os.path.join(os.path.dirname(path), CACHE_DIR, f"{os.path.basename(path)}.{key}")
    return base + ".moa", base + ".clip_vision"


def load_fastcomposer(path: str) -> LoadedMoA:
    moa_path, encoder_path = cache_paths(path)
    if os.path.isfile(moa_path) and os.path.isfile(encoder_path):
        try:
            return _loaded(path, load_moa_file(moa_path), fastcomposer.read_encoder(encoder_path))
        except WeightFileError as e:  # a damaged cache is made again
            log.warning("MoA: the cache of %s cannot be read, converting again (%s)", path, e)
    model, vision = convert_fastcomposer(path)
    try:
        fastcomposer.write_encoder(encoder_path, vision)
        fastcomposer.atomic_write(moa_path, lambda tmp: save_moa_file(tmp, model, "sd15", model.metadata))
        _remove_stale(path, moa_path, encoder_path)
    except OSError as e:  # a read-only model folder: this run uses the conversion, the next converts again
        log.warning("MoA: could not cache the conversion of %s in %s (%s)", path, os.path.dirname(moa_path), e)
        for p in model.parameters():  # the tensors may be views of the .bin's memory map: own them
            p.data = p.data.clone()
        return _loaded(path, model, {k: v.clone() for k, v in vision.items()})
    return _loaded(path, load_moa_file(moa_path), fastcomposer.read_encoder(encoder_path))


def convert_fastcomposer(path: str) -> tuple[MoAModel, dict]:
    """(MoA model with its metadata, image encoder state dict) of FastComposer's file, with a
    progress bar on the node; anything but FastComposer's layout is refused, naming the file."""
    import comfy.utils

    log.info("MoA: converting %s (FastComposer's weights) once; later loads read the cache", path)
    state = fastcomposer.read_state_dict(path)
    try:
        fastcomposer.check_keys(state, path)
    except WeightFileError as e:
        raise WeightFileError(
            path,
            f"is not FastComposer's published {FASTCOMPOSER_FILE} ({e.problem}). Load MoA Router reads MoA "
            f".safetensors files and FastComposer's {FASTCOMPOSER_FILE} from {FASTCOMPOSER_URL}",
            e.details,
        ) from None
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    model, vision = fastcomposer.convert(state, path=path, progress=progress)
    model.base_family = "sd15"
    model.metadata = fastcomposer.conversion_metadata(vision, os.path.basename(path))
    return model, vision


def _loaded(path: str, model: MoAModel, vision: dict) -> LoadedMoA:
    import comfy.clip_vision

    encoder = comfy.clip_vision.load_clipvision_from_sd(dict(vision))
    if encoder is None:
        raise WeightFileError(path, "its image encoder is not a CLIP vision model ComfyUI can load")
    return LoadedMoA(path, model, clip_vision=encoder)


def _remove_stale(path: str, *keep: str) -> None:
    """Earlier caches of the same source (before it was replaced): they would only fill the disk."""
    folder, prefix = os.path.dirname(keep[0]), os.path.basename(path) + "."
    for name in os.listdir(folder):
        full = os.path.join(folder, name)
        if name.startswith(prefix) and full not in keep and name.endswith((".moa", ".clip_vision")):
            try:
                os.remove(full)
            except OSError:
                pass
