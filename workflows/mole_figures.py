"""The MoLE paper's figures as graphs: on SD1.5 with experts and gates made by training/ (no SD1.5
MoLE weights were released: "(train first)" in the title), or on SDXL with the authors' MoLE-SDXL
release."""

from __future__ import annotations

from .builder import Graph, checkpoint, encode, latent, negative, sample, save, side_by_side
from .catalogue import (
    FACE_EXPERT,
    GATES,
    HAND_EXPERT,
    MOLE_SD15,
    MOLE_SDXL_SETTINGS,
    SDXL_CHECKPOINT,
    SDXL_FACE_EXPERT,
    SDXL_GATES,
    SDXL_HAND_EXPERT,
    SDXL_NAMES_NOTE,
)

MOLE_PROMPT = "photo of a young woman waving at the camera, upper body, detailed face and hands"


class MoLEGraph(Graph):
    experts: tuple = (FACE_EXPERT, HAND_EXPERT, GATES)  # face expert, hand expert, gates


def mole_graph(name: str, file_stem: str, title: str, figure: str, shows: str, sdxl: bool) -> MoLEGraph:
    """A MoLE figure's graph on SD1.5 (weights made with training/) or on SDXL with the released
    MoLE-SDXL files (name + "_sdxl"), at the released generation settings for that base.
    file_stem: the shipped files' name, "{base}" standing for "SD1.5, train first" or "SDXL"."""
    if sdxl:
        g = MoLEGraph(
            f"{name}_sdxl",
            f"{title} (SDXL, released weights)",
            figure,
            shows,
            MOLE_SDXL_SETTINGS,
            file_stem.format(base="SDXL"),
            "SDXL",
            SDXL_CHECKPOINT,
            files_note=SDXL_NAMES_NOTE,
        )
        g.experts = (SDXL_FACE_EXPERT, SDXL_HAND_EXPERT, SDXL_GATES)
        return g
    return MoLEGraph(
        name, f"{title} (SD1.5, train first)", figure, shows, MOLE_SD15, file_stem.format(base="SD1.5, train first")
    )


def mole_experts(g: MoLEGraph):
    face, hand, _ = g.experts
    return g.add(
        "MoLE_LoadExperts",
        expert_1=g.file(face),
        name_1="face",
        strength_1=1.0,
        expert_2=g.file(hand),
        name_2="hand",
        strength_2=1.0,
    )[0]


def mole(g: MoLEGraph, model, experts, mode="both", title=None):
    gates = g.file(g.experts[2])
    return g.add("MoLE_ApplyGating", title, model=model, experts=experts, gates=gates, mode=mode, strength=1.0)[0]


def mole_fig1_lora_refinement() -> Graph:
    g = mole_graph(
        "mole_fig1_lora_refinement",
        "01 MoLE Fig. 1 - refinement ({base})",
        "MoLE Fig. 1: low-rank refinement",
        "MoLE Fig. 1",
        "Each close-up expert applied as a plain LoRA at scales 0, 0.5 and 1, same seed: the face "
        "expert refines faces, the hand expert hands.",
        sdxl=False,
    )
    model, clip, vae = checkpoint(g)
    pos, neg, empty = encode(g, clip, MOLE_PROMPT), negative(g, clip), latent(g)
    base = sample(g, model, pos, neg, empty, vae, "scale 0 (base)")
    for expert, part in ((FACE_EXPERT, "face"), (HAND_EXPERT, "hand")):
        row = [base]
        for scale in (0.5, 1.0):
            lora = g.add(
                "LoraLoaderModelOnly",
                f"{part} expert x{scale}",
                model=model,
                lora_name=g.file(expert),
                strength_model=scale,
            )[0]
            row.append(sample(g, lora, pos, neg, empty, vae, f"{part} x{scale}"))
        save(g, side_by_side(g, row), f"{part}_scales_0_0.5_1")
    return g


def mole_fig7_gates(sdxl: bool = False) -> Graph:
    g = mole_graph(
        "mole_fig7_gates",
        "{n} MoLE Fig. 7 - gate maps ({{base}})".format(n="03" if sdxl else "02"),
        "MoLE Fig. 7: the gates at work",
        "MoLE Fig. 7",
        "The global gate of each expert per sampling step (plot) and each expert's local gate over the "
        "image (heat maps, bright = high) at the first, middle and last steps.",
        sdxl,
    )
    model, clip, vae = checkpoint(g)
    pos, neg = encode(g, clip, MOLE_PROMPT), negative(g, clip)
    recorded = g.add("MoLE_RecordGates", model=mole(g, model, mole_experts(g)))[0]
    images = sample(g, recorded, pos, neg, latent(g), vae, "MoLE (recorded)")
    maps = g.add("MoLE_GateMaps", model=recorded, images=images, steps="first, middle, last", sample=0, opacity=0.6)
    save(g, images, "image")
    save(g, maps[0], "global_gates_plot")
    save(g, maps[1], "local_gate_maps_face_hand")
    return g


def mole_fig8_9_comparison(sdxl: bool = False) -> Graph:
    g = mole_graph(
        "mole_fig8_9_comparison",
        "{n} MoLE Fig. 8, 9 - vs base ({{base}})".format(n="05" if sdxl else "04"),
        "MoLE Fig. 8 / 9: base model vs MoLE",
        "MoLE Fig. 8 and 9",
        f"Base {'SDXL' if sdxl else 'SD1.5'} and MoLE on the same two seeds (one batch), side by side.",
        sdxl,
    )
    model, clip, vae = checkpoint(g)
    pos = encode(g, clip, "a man playing the guitar on a street, upper body, detailed face and hands")
    neg, empty = negative(g, clip), latent(g, batch=2)
    gated = mole(g, model, mole_experts(g))
    save(g, sample(g, model, pos, neg, empty, vae, f"base {g.base}"), "base")
    save(g, sample(g, gated, pos, neg, empty, vae, "MoLE"), "mole")
    return g


def mole_table3_assignment_ablation(sdxl: bool = False) -> Graph:
    g = mole_graph(
        "mole_table3_assignment_ablation",
        "{n} MoLE Table 3 - ablation ({{base}})".format(n="07" if sdxl else "06"),
        "MoLE Table 3: assignment ablation",
        "MoLE Table 3",
        "Base, local gates only, global gates only and both, on the same seed.",
        sdxl,
    )
    model, clip, vae = checkpoint(g)
    pos, neg, empty = encode(g, clip, MOLE_PROMPT), negative(g, clip), latent(g)
    experts = mole_experts(g)
    row = [sample(g, model, pos, neg, empty, vae, "base")]
    for mode in ("local", "global", "both"):
        row.append(sample(g, mole(g, model, experts, mode, f"MoLE {mode}"), pos, neg, empty, vae, f"{mode} gates"))
    save(g, side_by_side(g, row), "base_local_global_both")
    return g


def _sdxl(make):
    def make_sdxl() -> Graph:
        return make(sdxl=True)

    make_sdxl.__name__ = f"{make.__name__}_sdxl"
    return make_sdxl


# In figure order, each SDXL graph beside its SD1.5 twin.
MOLE_WORKFLOWS = [
    mole_fig1_lora_refinement,
    mole_fig7_gates,
    _sdxl(mole_fig7_gates),
    mole_fig8_9_comparison,
    _sdxl(mole_fig8_9_comparison),
    mole_table3_assignment_ablation,
    _sdxl(mole_table3_assignment_ablation),
]
