# The shared fixtures (what each is, and which to use: see helpers/fixtures.py).
from helpers.fixtures import (  # noqa: F401
    clip_vision_h14_path,
    clip_vision_l14,
    clip_vision_l14_path,
    node_classes,
    sd15,
    sd15_controlnet_path,
    sd15_full,
    sd15_small,
    sdxl,
)
