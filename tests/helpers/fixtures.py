"""Session-scoped pytest fixtures over the random-weight models of helpers.random_models.

tests/host/conftest.py imports them for the host tests; another test folder imports the ones it
needs into its own conftest.py (`from helpers.fixtures import sd15  # noqa: F401`).

sd15                  SD15Models(path, model, clip, vae): the random thin SD1.5 checkpoint
                      (random_models.sd15_thin_checkpoint: every one of SD1.5's layers and key names,
                      each level at width 320) loaded once per session with
                      comfy.sd.load_checkpoint_guess_config (model: ModelPatcher, clip: comfy.sd.CLIP,
                      vae: comfy.sd.VAE). Shared: clone() before patching. SD1.5's real widths are
                      checked on the full file's header (tests/host/test_random_models.py).
sd15_full             (module scope) SD15Models with the full random SD1.5's UNet (real widths) and the
                      `sd15` CLIP and VAE: for FastComposer's weights, which fit SD1.5's widths only.
sd15_small            SD15Models of the shallow SD1.5-family checkpoint (random_models.sd15_small_checkpoint:
                      same CLIP and VAE as sd15, a 2-level UNet): for tests that do not depend on
                      SD1.5's depth (inversion, training loops), ~20x cheaper per UNet call.
sd15_controlnet_path  Path of the random ControlNet for the `sd15` UNet (comfy.controlnet.load_controlnet).
clip_vision_l14_path  Path of the random CLIP ViT-L/14 vision model (comfy.clip_vision.load).
clip_vision_l14       That model loaded by comfy.clip_vision.load, once per session (~3 s a load).
clip_vision_h14_path  Path of the random CLIP ViT-H/14 vision model (a wrong encoder for SD1.5).
sdxl                  SDXLBundle (model, positive, negative, latent()) of an in-process SDXL-layout
                      UNet (~5 GB): built once for all the tests that use it, freed right after the
                      last of them (tests/conftest.py counts them). Shared: clone() before patching.
                      Mark users slow.
pack                  (tests/conftest.py) this pack imported as ComfyUI imports it.
node_classes          The host's node class mappings with this pack's nodes registered, as the
                      server and workflows.run see them (initialised once per session).
encode_text(clip, text)  CLIPTextEncode's conditioning, once per (clip, text) per session.

Which to use: take `sd15` (never load the checkpoint yourself: a second load costs ~15 s and
2 GB); sample at 64x64 or smaller, 1 step, unless the test is about steps; make small weight
files (LoRAs, gates, MoA files) in module fixtures from `sd15.model`; put a test that needs
more than ~5 s under @pytest.mark.slow, so that `scripts/test.sh --fast` stays quick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
from pathlib import Path

import pytest

from . import random_models


@dataclasses.dataclass
class SD15Models:
    path: Path
    model: object  # comfy.model_patcher.ModelPatcher
    clip: object  # comfy.sd.CLIP
    vae: object  # comfy.sd.VAE


def free_host_memory() -> None:
    """Drop ComfyUI's records of models nobody references any more and collect them."""
    gc.collect()
    import comfy.model_management as mm

    mm.cleanup_models_gc()
    mm.cleanup_models()
    gc.collect()


@contextlib.contextmanager
def model_folders(**folders: Path):
    """Register folders with ComfyUI's folder_paths (e.g. loras=..., mole=...) ahead of every
    other folder of that kind, and unregister them on exit: tests share one process, and a
    file name another test also uses must resolve to this test's file."""
    import folder_paths

    for kind, folder in folders.items():
        folder_paths.add_model_folder_path(kind, str(folder), is_default=True)
    try:
        yield
    finally:
        for kind, folder in folders.items():
            paths = folder_paths.folder_names_and_paths[kind][0]
            if str(folder) in paths:
                paths.remove(str(folder))
        folder_paths.filename_list_cache.clear()


def _load_checkpoint(path: Path) -> SD15Models:
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, embedding_directory=None
    )
    return SD15Models(path=path, model=model, clip=clip, vae=vae)


@functools.cache
def load_sd15() -> SD15Models:
    """The random thin SD1.5 checkpoint loaded by the host, once per process (so the fixture may be
    imported by several conftest/test modules without loading it twice)."""
    random_models.import_host()
    return _load_checkpoint(random_models.sd15_thin_checkpoint())


@functools.cache
def load_sd15_small() -> SD15Models:
    random_models.import_host()
    return _load_checkpoint(random_models.sd15_small_checkpoint())


@pytest.fixture(scope="session")
def sd15():
    yield load_sd15()
    # Free it while ComfyUI's modules are still alive (not at interpreter exit).
    load_sd15.cache_clear()
    free_host_memory()


@pytest.fixture(scope="session")
def sd15_small():
    yield load_sd15_small()
    load_sd15_small.cache_clear()
    free_host_memory()


def load_sd15_full_unet(clip, vae, fp16_weights: bool = False) -> SD15Models:
    """The full random SD1.5's UNet (SD1.5's real widths: what FastComposer's weights fit), with
    the given CLIP and VAE (the `sd15` fixture's are the same weights: every random SD1.5 file
    draws them from the same seeds). fp16_weights: 1.7 GB instead of 3.4 GB, for a UNet that only
    gives its weights (ComfyUI would cast every layer to fp32 at every call on the CPU)."""
    import comfy.sd
    import torch

    path = random_models.sd15_checkpoint()
    options = {"dtype": torch.float16} if fp16_weights else {}
    model = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=False, output_clip=False, model_options=options
    )[0]
    return SD15Models(path=path, model=model, clip=clip, vae=vae)


@pytest.fixture(scope="module")
def sd15_full(sd15):
    """load_sd15_full_unet with the `sd15` CLIP and VAE (fp32 weights); module-scoped, freed after."""
    models = load_sd15_full_unet(sd15.clip, sd15.vae)
    yield models
    del models
    free_host_memory()


@pytest.fixture(scope="session")
def sd15_controlnet_path() -> Path:
    return random_models.sd15_thin_controlnet()


@pytest.fixture(scope="session")
def clip_vision_l14_path() -> Path:
    return random_models.clip_vision_vit_l14()


@pytest.fixture(scope="session")
def clip_vision_l14(clip_vision_l14_path):
    import comfy.clip_vision

    yield comfy.clip_vision.load(str(clip_vision_l14_path))
    free_host_memory()


_ENCODED: dict = {}


def encode_text(clip, text: str):
    """CLIPTextEncode's conditioning of `text`, computed once per (clip, text) per session:
    text encoding is what few tests are about, and each costs ~0.3 s here. Do not modify it."""
    key = (id(clip), text)
    if key not in _ENCODED:
        import torch

        import nodes

        with torch.inference_mode():
            _ENCODED[key] = (clip, nodes.CLIPTextEncode().encode(clip, text)[0])  # holds clip: its id stays unique
    return _ENCODED[key][1]


@pytest.fixture(scope="session")
def node_classes(pack):
    """The host's node classes with this pack's nodes, as the runner and the server see them."""
    import asyncio

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    extension = asyncio.run(pack.comfy_entrypoint())
    for node in asyncio.run(extension.get_node_list()):
        nodes.NODE_CLASS_MAPPINGS.setdefault(node.GET_SCHEMA().node_id, node)
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="session")
def clip_vision_h14_path() -> Path:
    return random_models.clip_vision_vit_h14()


class SharedSDXL:
    """One SDXL bundle for the tests that use the `sdxl` fixture: the thin SDXL UNet (SDXL's layer
    names at width 320, random_models.SDXL_THIN_UNET_CONFIG; SDXL's real widths are checked on a
    meta-device build), made for the first of them, freed after the last (counted over the
    collected tests by tests/conftest.py), so it is not held while other tests run."""

    bundle: random_models.SDXLBundle | None = None
    users_left = 0

    @classmethod
    def get(cls) -> random_models.SDXLBundle:
        if cls.bundle is None:
            cls.bundle = random_models.sdxl_model(unet_config=random_models.SDXL_THIN_UNET_CONFIG)
        return cls.bundle

    @classmethod
    def used_by_one(cls) -> None:
        cls.users_left -= 1
        if cls.users_left <= 0 and cls.bundle is not None:
            # pytest keeps fixture values until the session ends: drop what the bundle holds.
            cls.bundle.model = cls.bundle.positive = cls.bundle.negative = None
            cls.bundle = None
            free_host_memory()


@pytest.fixture
def sdxl():
    return SharedSDXL.get()
