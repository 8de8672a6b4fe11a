"""The shipped workflows: every graph, in the order the template browser shows them.

Each graph is written once as an API-format graph (mole_figures.py, moa_figures.py, with the
building blocks in builder.py and the files and settings in catalogue.py) and names its own
shipped file. `python3 -m workflows.build` turns each into `workflows/<file>.json` (the editor's
format, laid out by the real frontend, with its note, download entries and pack identification),
its card picture `workflows/<file>.jpg`, and `workflows/api/<file>.json` (as `python3 -m
workflows.run` and the /prompt API take it).
"""

from __future__ import annotations

from .builder import Graph, Ref, encode, inject, latent, load_image, negative, sample, save, side_by_side
from .catalogue import *  # noqa: F403  (the files and settings, for scripts and tests)
from .catalogue import Settings
from .moa_figures import COUPLE_PROMPTS, MOA_WORKFLOWS
from .mole_figures import MOLE_WORKFLOWS

__all__ = ["Graph", "Ref", "Settings", "encode", "inject", "latent", "load_image", "negative", "sample", "save"]
__all__ += ["side_by_side", "COUPLE_PROMPTS", "WORKFLOWS", "FILES", "SDXL_WORKFLOWS", "all_graphs"]

# ComfyUI 0.8.0's template browser (frontend 1.35) makes a pack's card from the file name alone:
# it is the card's title and its description; the "A -> Z" sort orders the cards by it. So the
# names read as titles, numbered to keep this order (tests/core/test_workflow_files.py): MoLE
# first, then MoA, in figure order.
WORKFLOWS = MOLE_WORKFLOWS + MOA_WORKFLOWS


def all_graphs() -> list[Graph]:
    return [make() for make in WORKFLOWS]


FILES = {g.name: g.file_stem for g in all_graphs()}  # graph id -> shipped file name
SDXL_WORKFLOWS = [make.__name__ for make in WORKFLOWS if make.__name__.endswith("_sdxl")]
