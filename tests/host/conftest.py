import pytest

import hostenv
from helpers.fixtures import clip_vision_h14_path, clip_vision_l14_path, sd15, sd15_controlnet_path, sdxl  # noqa: F401


@pytest.fixture(scope="session")
def pack():
    """This pack, imported as ComfyUI imports a custom node package (host on sys.path first)."""
    return hostenv.import_pack()
