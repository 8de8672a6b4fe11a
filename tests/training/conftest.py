"""Fixtures of the training-script tests: the random SD1.5 checkpoint, the host's model of it,
the pack's MoLE nodes and experts trained by the stage-2 script itself."""

from __future__ import annotations

from pathlib import Path

import hostenv
import pytest
import torch
from helpers.fixtures import sd15, sd15_small  # noqa: F401  (session-scoped random SD1.5s, loaded by the host)
from training_helpers import make_dataset, run_training, tiny_args


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs and sampling on one thread (see script_env), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pack():
    return hostenv.import_pack()


@pytest.fixture(scope="session")
def checkpoint() -> Path:
    from helpers import random_models

    return random_models.sd15_thin_checkpoint()


@pytest.fixture(scope="session")
def small_checkpoint() -> Path:
    """An SD1.5-family checkpoint with a shallow UNet (the file of the `sd15_small` fixture): for
    the tests of what does not depend on SD1.5's depth (the loop's engineering, learning, bf16,
    stage 1's outputs), where the full UNet costs minutes of CPU."""
    from helpers import random_models

    return random_models.sd15_small_checkpoint()


@pytest.fixture(scope="session")
def trained_experts(tmp_path_factory, small_checkpoint) -> dict[str, Path]:
    """A face and a hand expert made by the stage-2 script (rank 4, 2 steps each, 64 px) on the
    shallow SD1.5-family checkpoint (`small_checkpoint`, loaded as `sd15_small`), in a folder the
    tests register with ComfyUI as a loras folder."""
    checkpoint = small_checkpoint
    root = tmp_path_factory.mktemp("trained_experts")
    data = make_dataset(root / "closeups", n=2)
    loras = root / "loras"
    for part, seed in (("face", 1), ("hand", 2)):
        run_training(
            "mole_expert",
            "--part",
            part,
            "--rank",
            "4",
            "--alpha",
            "4",
            "--lr",
            "1e-3",
            "--seed",
            seed,
            *tiny_args(checkpoint, data, loras / f"{part}.safetensors", 2),
        )
    return {"face": loras / "face.safetensors", "hand": loras / "hand.safetensors", "loras": loras, "data": data}


@pytest.fixture(scope="module")
def mole_nodes(pack):
    import importlib

    return importlib.import_module(f"{hostenv.PACK_MODULE}.nodes.mole_nodes")
