"""Measuring quality as the papers did.

* `quality.prompts`: the MoLE paper's human-centric prompt sets (COCO Human Prompts, DiffusionDB
  Human Prompts) built from the raw caption files, and the MoA / FastComposer single-subject
  protocol (`quality.moa_protocol`), written as JSON lines with their source ids.
* `quality.generate`: renders a prompt set for "base" and "with the method" at fixed seeds through
  the host's executor (workflows/run.py), resumable, with images and a manifest.
* `quality.metrics`: HPS v2, ImageReward, CLIP image-text similarity, face identity similarity,
  each loaded lazily from its package.
* `quality.report`: method x metric tables (mean, 95% interval over prompts) in Markdown and CSV,
  a plot of per-prompt differences, and the papers' numbers beside them.

Run `python3 -m quality --help` from the pack's folder. Nothing here is imported by the nodes.
"""
