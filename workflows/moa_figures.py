"""The MoA paper's figures as graphs, on FastComposer's published weights (no training): Load MoA
Router reads FastComposer's pytorch_model.bin as it is, its image encoder included, so MoA
Subject Inject's clip_vision stays unwired. A trained MoA file is one widget change away."""

from __future__ import annotations

from .builder import (
    Graph,
    checkpoint,
    encode,
    inject,
    latent,
    load_image,
    moa_router,
    negative,
    sample,
    save,
    side_by_side,
)
from .catalogue import (
    FASTCOMPOSER,
    KEEP_PERSON,
    MOA_DDIM,
    MOA_UNIPC,
    OPENPOSE,
    PHOTO_ONE,
    PHOTO_TWO,
    POSE,
    STYLE_LORA,
    SUBJECTS,
    TRAINED_MOA,
)

MOA_SETUP = f"""## Weights (no training)

Put FastComposer's published `{FASTCOMPOSER.name}` ({FASTCOMPOSER.url}) in `ComfyUI/models/moa/`: Load MoA
Router reads it as it is (the first load converts it, with a progress bar, and keeps the result), its
fine-tuned image encoder included, so nothing else is needed. Faces work best (FastComposer was trained on FFHQ).

A trained MoA file (training/moa_train.py, e.g. `{TRAINED_MOA}`) is one widget change away: pick it in Load MoA
Router's `moa_name` (a file made without its image encoder also needs Load CLIP Vision, CLIP ViT-L/14, wired
to MoA Subject Inject's `clip_vision`)."""


def moa_graph(name: str, file_stem: str, title: str, figure: str, shows: str, settings=MOA_UNIPC) -> Graph:
    return Graph(name, title, figure, shows, settings, file_stem, setup=MOA_SETUP)


COUPLE_PROMPTS = [
    "a man and a woman sitting on a sofa",
    "a man and a woman reading a book together",
    "a man and a woman dancing in Paris",
    "a man and a woman on top of a mountain",
    "a man and a woman running in a park",
    "a man and a woman in a lavender farm",
    "a man and a woman, painting in the style of Van Gogh",
]


def moa_fastcomposer_quickstart() -> Graph:
    g = moa_graph(
        "moa_fastcomposer_quickstart",
        "08 MoA quickstart - one subject, no training",
        "MoA quick start: one subject, no training",
        "",
        "The smallest MoA graph: one subject photo put into one prompt's picture with FastComposer's published "
        "weights and the training-free attention router. The figure graphs that follow show more (subject "
        "swap, couples, router maps, ControlNet, morphing, real photos, style).",
    )
    model, clip, vae = checkpoint(g)
    moa = moa_router(g)
    subject = load_image(g, SUBJECTS[0], "subject")
    patched, pos = inject(g, model, moa, clip, None, "a man sitting at a cafe table, smiling", "man", [subject])
    save(g, sample(g, patched, pos, negative(g, clip), latent(g), vae, "MoA"), "subject")
    return g


def moa_fig6_router_maps() -> Graph:
    g = moa_graph(
        "moa_fig6_router_maps",
        "09 MoA Fig. 6 - router maps",
        "MoA Fig. 6: router maps",
        "MoA Fig. 6",
        "The prior's router weight per pixel (bright: prior, dark: personalized) at the first, middle and last "
        "steps: averaged over layers, and for four chosen layers.",
    )
    model, clip, vae = checkpoint(g)
    moa = moa_router(g)
    man, woman = load_image(g, SUBJECTS[0], "man"), load_image(g, SUBJECTS[1], "woman")
    patched, pos = inject(g, model, moa, clip, None, COUPLE_PROMPTS[2], "man, woman", [man, woman])
    recorded = g.add("MoA_RecordRouter", model=patched)[0]
    images = sample(g, recorded, pos, negative(g, clip), latent(g), vae, "MoA (recorded)")
    save(g, images, "image")
    # Four cross-attention layers (down 32x32, down 16x16, up 16x16, up 32x32 at 512 px) of those
    # FastComposer's attention router reads its maps from (fastcomposer.LOCALIZATION_BLOCKS).
    for layers, title in (("mean", "mean_of_layers"), ("5, 11, 17, 23", "layers_5_11_17_23")):
        maps = g.add(
            "MoA_RouterMaps",
            model=recorded,
            images=images,
            layers=layers,
            steps="first, middle, last",
            sample=0,
            opacity=0.6,
        )[0]
        save(g, maps, f"router_{title}")
    return g


def moa_fig7_subject_swap() -> Graph:
    g = moa_graph(
        "moa_fig7_subject_swap",
        "10 MoA Fig. 7 - subject swap",
        "MoA Fig. 7: subject swap at a fixed seed",
        "MoA Fig. 7",
        "One prompt and seed, three subject images: only the subject changes; layout and background "
        "come from the prior (first image: the prior alone).",
    )
    model, clip, vae = checkpoint(g)
    moa = moa_router(g)
    text = "a man sitting at a cafe table, smiling"
    neg, empty = negative(g, clip), latent(g)
    row = [sample(g, model, encode(g, clip, text, "prompt (prior)"), neg, empty, vae, "prior only")]
    for i, entry in enumerate(SUBJECTS, 1):
        patched, pos = inject(g, model, moa, clip, None, text, "man", [load_image(g, entry)], f"subject {i}")
        row.append(sample(g, patched, pos, neg, empty, vae, f"subject {i}"))
    save(g, side_by_side(g, row), "prior_then_subjects")
    return g


def moa_fig8_couples() -> Graph:
    g = moa_graph(
        "moa_fig8_couples",
        "11 MoA Fig. 8 - two-subject couples",
        "MoA Fig. 8: two-subject couples",
        "MoA Fig. 8",
        "Subject 1 as 'man' and subject 2 as 'woman' in the paper's scenes: sofa, book, Paris, mountain, "
        "running, lavender farm, Van Gogh.",
    )
    model, clip, vae = checkpoint(g)
    moa = moa_router(g)
    man, woman = load_image(g, SUBJECTS[0], "man"), load_image(g, SUBJECTS[1], "woman")
    neg, empty = negative(g, clip), latent(g)
    row = []
    for text in COUPLE_PROMPTS:
        scene = text.split(" ", 5)[-1]
        patched, pos = inject(g, model, moa, clip, None, text, "man, woman", [man, woman], scene)
        row.append(sample(g, patched, pos, neg, empty, vae, scene))
    save(g, side_by_side(g, row), "couples")
    return g


def moa_fig11_controlnet_pose() -> Graph:
    g = moa_graph(
        "moa_fig11_controlnet_pose",
        "12 MoA Fig. 11 - pose with ControlNet",
        "MoA Fig. 11: pose control with ControlNet",
        "MoA Fig. 11",
        "An OpenPose ControlNet fixes the pose at a fixed seed while the subject is swapped (first image: the prior).",
    )
    model, clip, vae = checkpoint(g)
    moa = moa_router(g)
    control = g.add("ControlNetLoader", control_net_name=g.file(OPENPOSE))[0]
    pose = load_image(g, POSE, "pose")
    text = "a man standing on a beach"
    neg, empty = negative(g, clip), latent(g)

    def posed(positive, title):
        applied = g.add(
            "ControlNetApplyAdvanced",
            title,
            positive=positive,
            negative=neg,
            control_net=control,
            image=pose,
            strength=1.0,
            start_percent=0.0,
            end_percent=1.0,
            vae=vae,
        )
        return applied[0], applied[1]

    pos, cn_neg = posed(encode(g, clip, text, "prompt (prior)"), "pose (prior)")
    row = [sample(g, model, pos, cn_neg, empty, vae, "prior + pose")]
    for i, entry in enumerate(SUBJECTS[:2], 1):
        patched, subject_pos = inject(g, model, moa, clip, None, text, "man", [load_image(g, entry)], f"subject {i}")
        pos, cn_neg = posed(subject_pos, f"pose (subject {i})")
        row.append(sample(g, patched, pos, cn_neg, empty, vae, f"subject {i} + pose"))
    save(g, side_by_side(g, row), "pose_prior_then_subjects")
    return g


def moa_fig12_morphing() -> Graph:
    g = moa_graph(
        "moa_fig12_morphing",
        "13 MoA Fig. 12 - subject morphing",
        "MoA Fig. 12: subject morphing",
        "MoA Fig. 12",
        "Subject 1 morphed into subject 2 in four steps (image embeddings interpolated), same seed.",
    )
    model, clip, vae = checkpoint(g)
    moa = moa_router(g)
    first, second = load_image(g, SUBJECTS[0], "from"), load_image(g, SUBJECTS[1], "to")
    text = "a close-up photo of a man, studio light"
    neg, empty = negative(g, clip), latent(g)
    row = []
    for morph in (0.0, 0.33, 0.67, 1.0):
        patched, pos = inject(
            g, model, moa, clip, None, text, "man", [first], f"morph {morph}", morph_image=second, morph=morph
        )
        row.append(sample(g, patched, pos, neg, empty, vae, f"morph {morph}"))
    save(g, side_by_side(g, row), "morph_0_to_1")
    return g


def ddim_swap(g: Graph, title: str, model, moa_model, positive, negative, vae, image):
    # Every widget is written, optional ones included, as the editor's "Export (API)" does.
    return g.add(
        "MoA_DDIMSwap",
        title,
        model=model,
        moa_model=moa_model,
        positive=positive,
        negative=negative,
        vae=vae,
        image=image,
        steps=g.settings.steps,
        cfg=g.settings.cfg,
        inversion_cfg=g.settings.cfg,
        refine_iters=0,
        inversion="ddim",
        null_text_iters=10,
        null_text_lr=0.01,
        null_text_early_stop=1e-5,
    )


def moa_fig13_real_photo_swap() -> Graph:
    g = moa_graph(
        "moa_fig13_real_photo_swap",
        "14 MoA Fig. 13 - swap in real photos",
        "MoA Fig. 13: subject swap in real photos",
        "MoA Fig. 13",
        "DDIM inversion of a real photo with the prior ('a person'), regenerated with MoA injecting the new "
        "subject: one person; two persons ('a person and a person': the kept person's crop in the first "
        "token, the new subject in the second). Limits: small faces and many people swap poorly.",
        MOA_DDIM,
    )
    model, clip, vae = checkpoint(g)
    moa = moa_router(g)
    subject = load_image(g, SUBJECTS[0], "new subject")
    neg = negative(g, clip)
    patched, pos = inject(g, model, moa, clip, None, "a person", "person", [subject], "one person")
    swap = ddim_swap(g, "swap (one person)", model, patched, pos, neg, vae, load_image(g, PHOTO_ONE, "photo"))
    save(g, swap[0], "one_person")
    keep = load_image(g, KEEP_PERSON, "person to keep")
    patched, pos = inject(
        g, model, moa, clip, None, "a person and a person", "person#1, person#2", [keep, subject], "two persons"
    )
    swap = ddim_swap(g, "swap (two persons)", model, patched, pos, neg, vae, load_image(g, PHOTO_TWO, "photo of two"))
    save(g, swap[0], "two_persons")
    return g


def moa_fig21_22_style_and_timelapse() -> Graph:
    g = moa_graph(
        "moa_fig21_22_style_and_timelapse",
        "15 MoA Fig. 21, 22 - style, time lapse",
        "MoA Fig. 21 / 22: style LoRA and time lapse",
        "MoA Fig. 21 and 22",
        "A style LoRA under MoA (the subject keeps its identity in the style); and a time lapse from 'person' "
        "to 'kid' (token embeddings interpolated), same seed.",
    )
    model, clip, vae = checkpoint(g)
    moa = moa_router(g)
    subject = load_image(g, SUBJECTS[0], "subject")
    neg, empty = negative(g, clip), latent(g)
    styled = g.add(
        "LoraLoader",
        "style LoRA",
        model=model,
        clip=clip,
        lora_name=g.file(STYLE_LORA),
        strength_model=0.8,
        strength_clip=0.8,
    )
    text = "a portrait of a person, illustration"
    patched, pos = inject(g, styled[0], moa, styled[1], None, text, "person", [subject], "subject + style")
    save(g, sample(g, patched, pos, neg, empty, vae, "style LoRA + MoA"), "style_lora")
    row = []
    for amount in (0.0, 0.5, 1.0):
        patched, pos = inject(
            g,
            model,
            moa,
            clip,
            None,
            "a person walking in a park",
            "person",
            [subject],
            f"time lapse {amount}",
            timelapse_word="kid",
            timelapse=amount,
        )
        row.append(sample(g, patched, pos, neg, empty, vae, f"person -> kid {amount}"))
    save(g, side_by_side(g, row), "timelapse_person_to_kid")
    return g


# The quick start (one subject, one image) first, then the figures in order.
MOA_WORKFLOWS = [
    moa_fastcomposer_quickstart,
    moa_fig6_router_maps,
    moa_fig7_subject_swap,
    moa_fig8_couples,
    moa_fig11_controlnet_pose,
    moa_fig12_morphing,
    moa_fig13_real_photo_swap,
    moa_fig21_22_style_and_timelapse,
]
