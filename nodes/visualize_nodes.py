"""Pictures of MoLE's gates and MoA's routers at work (MoLE Fig. 7, MoA Fig. 6).

A Record node returns a clone of the model that also records (the model it was given, and
sampling without a Record node, pay nothing); the sampler fills the recording; a Maps node,
wired after the decoded images, draws it. The recording rides on the model as a ModelPatcher
attachment and is cleared when a new sampling run starts.
"""

from __future__ import annotations

import functools

import comfy.patcher_extension
import numpy
import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw, ImageFont

from ..mixture_core.recording import GateRecording, RouterRecording, overlay, pick_steps
from .moa_patch import find_moa_patch, observe_moa
from .mole_nodes import find_mole_layers
from .patching import conditional_rows

GATES_KEY = "mole_moa.gate_recording"
ROUTER_KEY = "mole_moa.router_recording"


def track_calls(model, recording, key: str) -> None:
    """Tell the recording where each sampling run starts and what each model call holds,
    through wrappers (which chain with other packs' wrappers)."""

    def outer_sample(executor, *args, **kwargs):
        recording.reset()
        return executor(*args, **kwargs)

    def diffusion_model(executor, x, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
        sigmas = options.get("sigmas")
        if sigmas is not None:
            rows = conditional_rows(options.get("cond_or_uncond"), x.shape[0])
            recording.begin_call(
                float(sigmas.reshape(-1)[0]),
                rows if rows is not None else torch.ones(x.shape[0], dtype=torch.bool),
                tuple(x.shape[-2:]),
            )
        return executor(x, *args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, outer_sample)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, key, diffusion_model)


def recording_of(model, key: str, record_node: str):
    recording = model.get_attachment(key)
    if recording is None:
        raise ValueError(f"this model records nothing: wire the MODEL from {record_node} (the one the sampler used)")
    if not recording.sigmas:
        raise ValueError(f"nothing was recorded: sample with the MODEL from {record_node} before drawing its maps")
    return recording


# ---- MoLE ---------------------------------------------------------------------------------


def record_mole_gates(model):
    """A clone of a MoLE-patched model whose MoLE layers report their gates to a recording."""
    mole_forwards = find_mole_layers(model)
    if not mole_forwards:
        raise ValueError("MoLE Record Gates: this model has no MoLE layers; wire the MODEL from Apply MoLE Gating")
    recording = GateRecording(next(iter(mole_forwards.values())).layer.expert_names)
    patched = model.clone()
    for key, forward in mole_forwards.items():
        patched.add_object_patch(key, forward.with_observer(functools.partial(recording.observe, key)))
    track_calls(patched, recording, GATES_KEY)
    patched.set_attachments(GATES_KEY, recording)
    return patched


_COLORS = [(230, 85, 13), (49, 130, 189), (49, 163, 84), (117, 107, 177), (189, 158, 57)]


def plot_series(
    series: torch.Tensor, names: list[str], title: str, x_label: str, y_label: str, size=(512, 320)
) -> torch.Tensor:
    """A line plot of series (steps, k) with values in [0, 1]: (H, W, 3) in [0, 1]."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    left, right, top, bottom = 48, width - 12, 28, height - 36
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = bottom - tick * (bottom - top)
        draw.line([left - 4, y, left, y], fill=(0, 0, 0))
        draw.text((4, y - 6), f"{tick:.2f}", fill=(0, 0, 0), font=font)
    steps = series.shape[0]
    for s in sorted({0, steps // 2, steps - 1}):
        x = left + (s / max(steps - 1, 1)) * (right - left)
        draw.line([x, bottom, x, bottom + 4], fill=(0, 0, 0))
        draw.text((x - 4, bottom + 6), str(s), fill=(0, 0, 0), font=font)
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    draw.text(((left + right) // 2 - 12, height - 16), x_label, fill=(0, 0, 0), font=font)
    draw.text((4, top - 20), y_label, fill=(0, 0, 0), font=font)
    for k, name in enumerate(names):
        color = _COLORS[k % len(_COLORS)]
        points = [
            (left + (s / max(steps - 1, 1)) * (right - left), bottom - float(series[s, k]) * (bottom - top))
            for s in range(steps)
            if not torch.isnan(series[s, k])
        ]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        legend_y = top + 12 + 14 * k
        draw.line([right - 110, legend_y, right - 94, legend_y], fill=color, width=2)
        draw.text((right - 88, legend_y - 6), name, fill=color, font=font)
    return torch.from_numpy(numpy.array(image)).float() / 255.0


def draw_gate_maps(
    model, images: torch.Tensor, steps: str, sample: int, opacity: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(plot of the global gates per step (1, H, W, 3), local gate maps over the image
    (steps x experts, H, W, 3)) of a recorded MoLE run."""
    recording = recording_of(model, GATES_KEY, "MoLE Record Gates")
    names = recording.expert_names
    gates = recording.global_gates()  # (steps, B, n)
    image = images[min(sample, images.shape[0] - 1)]
    if gates.numel():
        row = min(sample, gates.shape[1] - 1)
        plot = plot_series(gates[:, row], names, "MoLE global gate per expert (mean over layers)", "step", "gate")
    else:  # mode "local": no global gate to plot
        plot = plot_series(
            torch.full((len(recording.sigmas), len(names)), float("nan")),
            names,
            "no global gates (mode: local)",
            "step",
            "gate",
        )
    maps = []
    for step in pick_steps(steps, len(recording.sigmas)):
        local = recording.local_maps(step)
        for expert in range(len(names)):
            if local is None:  # mode "global": no per-token gate
                maps.append(image.float().cpu())
            else:
                maps.append(overlay(image, local[min(sample, local.shape[0] - 1), expert], opacity))
    return plot[None], torch.stack(maps)


# ---- MoA ----------------------------------------------------------------------------------


def record_moa_router(model):
    """A clone of a MoA-patched model whose MoA patch (the last MoA applied) reports its
    routers to a recording."""
    patch = find_moa_patch(model)
    if patch is None:
        raise ValueError("MoA Record Router: this model has no MoA layers; wire the MODEL from MoA Subject Inject")
    recording = RouterRecording()
    patched = observe_moa(model, patch, recording.observe)
    track_calls(patched, recording, ROUTER_KEY)
    patched.set_attachments(ROUTER_KEY, recording)
    return patched


def pick_layers(spec: str, recorded: list[int]) -> list[int] | None:
    """Layer indices from "mean" (None: the mean of all), "all", or a comma list of indices."""
    spec = spec.strip().lower()
    if spec == "mean":
        return None
    if spec == "all":
        return recorded
    chosen = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            index = int(part)
        except ValueError:
            raise ValueError(f"layer {part!r}: use 'mean', 'all' or layer numbers such as '0, 8, 15'") from None
        if index not in recorded:
            raise ValueError(f"layer {index} was not recorded (recorded: {recorded[0]}..{recorded[-1]})")
        chosen.append(index)
    return chosen


def draw_router_maps(model, images: torch.Tensor, layers: str, steps: str, sample: int, opacity: float) -> torch.Tensor:
    """The prior's weight per pixel over the image, for each chosen step and layer (or the
    mean over layers): (steps x layers, H, W, 3). Dark: the personalized branch; bright: the prior."""
    recording = recording_of(model, ROUTER_KEY, "MoA Record Router")
    recorded = recording.layers()
    if not recorded:
        raise ValueError("the routers recorded nothing (MoA strength 0, or outside its start/end percent)")
    image = images[min(sample, images.shape[0] - 1)]
    chosen = pick_layers(layers, recorded)
    out = []
    for step in pick_steps(steps, len(recording.sigmas)):
        present = [i for i in recorded if (step, i) in recording.maps]
        if chosen is None:
            height, width = recording.latent_size
            resized = [
                torch.nn.functional.interpolate(
                    recording.maps[(step, i)][:, None], size=(height, width), mode="bilinear"
                )[:, 0]
                for i in present
            ]
            per_layer = [torch.stack(resized).mean(0)] if resized else []
        else:
            per_layer = [recording.maps[(step, i)] for i in chosen if (step, i) in recording.maps]
        for m in per_layer:
            out.append(overlay(image, m[min(sample, m.shape[0] - 1)], opacity))
    if not out:
        raise ValueError("no router maps at the chosen steps (MoA inactive there: see its start/end percent)")
    return torch.stack(out)


# ---- nodes --------------------------------------------------------------------------------


def preview(cls, *batches) -> ui.PreviewImage:
    """The pictures shown in the node, as core's Preview Image shows them (temp files); batches
    of different sizes (the plot and the maps) are saved one after the other."""
    shown = ui.PreviewImage(batches[0], cls=cls)
    for batch in batches[1:]:
        shown.values += ui.PreviewImage(batch, cls=cls).values
    return shown


_OPACITY_TIP = "How strongly the maps cover the image (0: image only, 1: maps only)"
_STEPS_TIP = "Steps to draw: numbers (0 first, -1 last) or first/middle/last, comma separated"


class MoLERecordGates(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoLE_RecordGates",
            display_name="MoLE Record Gates",
            category="MoLE/visualize",
            description="Returns the MoLE model with its gates recorded while it samples; draw them with MoLE Gate Maps.",
            inputs=[io.Model.Input("model", tooltip="The model from Apply MoLE Gating")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(record_mole_gates(model))


class MoLEGateMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoLE_GateMaps",
            display_name="MoLE Gate Maps",
            category="MoLE/visualize",
            description="Draws what the gates did in the last sampling run of a MoLE Record Gates model: the global "
            "gate of each expert per step (plot) and each expert's local gate over the image (heat maps, bright = high).",
            inputs=[
                io.Model.Input("model", tooltip="The model from MoLE Record Gates that the sampler used"),
                io.Image.Input("images", tooltip="The decoded images of that run (the maps are drawn over them)"),
                io.String.Input("steps", default="first, middle, last", tooltip=_STEPS_TIP),
                io.Int.Input("sample", default=0, min=0, max=63, tooltip="Which image of the batch"),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05, tooltip=_OPACITY_TIP),
            ],
            outputs=[
                io.Image.Output(display_name="global_gates_plot"),
                io.Image.Output(display_name="local_gate_maps"),
            ],
        )

    @classmethod
    def execute(cls, model, images, steps, sample, opacity) -> io.NodeOutput:
        plot, maps = draw_gate_maps(model, images, steps, sample, opacity)
        return io.NodeOutput(plot, maps, ui=preview(cls, plot, maps))


class MoARecordRouter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoA_RecordRouter",
            display_name="MoA Record Router",
            category="MoA/visualize",
            description="Returns the MoA model with its routers recorded while it samples; draw them with MoA Router Maps.",
            inputs=[io.Model.Input("model", tooltip="The model from MoA Subject Inject")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(record_moa_router(model))


class MoARouterMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoA_RouterMaps",
            display_name="MoA Router Maps",
            category="MoA/visualize",
            description="Draws the prior's router weight per pixel (bright: prior, dark: personalized) in the last "
            "sampling run of a MoA Record Router model, for the chosen steps and layers.",
            inputs=[
                io.Model.Input("model", tooltip="The model from MoA Record Router that the sampler used"),
                io.Image.Input("images", tooltip="The decoded images of that run"),
                io.String.Input(
                    "layers", default="mean", tooltip="mean (of all layers), all, or layer numbers such as '0, 8, 15'"
                ),
                io.String.Input("steps", default="first, middle, last", tooltip=_STEPS_TIP),
                io.Int.Input("sample", default=0, min=0, max=63, tooltip="Which image of the batch"),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05, tooltip=_OPACITY_TIP),
            ],
            outputs=[io.Image.Output(display_name="router_maps")],
        )

    @classmethod
    def execute(cls, model, images, layers, steps, sample, opacity) -> io.NodeOutput:
        maps = draw_router_maps(model, images, layers, steps, sample, opacity)
        return io.NodeOutput(maps, ui=preview(cls, maps))


NODES = [MoLERecordGates, MoLEGateMaps, MoARecordRouter, MoARouterMaps]
