"""The single-subject evaluation protocol of the MoA paper (App. D, Tab. 3: identity preservation
and prompt consistency, "following previous works"), as FastComposer's evaluation code defines it
(github.com/mit-han-lab/fastcomposer, evaluation/single_object/data.py, run.py and
single_object_evaluation.py):

* test identities: 15 CelebA images (MoA paper Sec. 5: "15 subjects from the CelebA dataset"),
  each with its class word; the reference image of identity X is the first `*.jpg` (sorted) in
  REFERENCE_DIR/X/;
* prompts: 40 per identity, 10 each of accessory, style, action and context, with the class word
  as the subject word ("a man wearing a red hat"); FastComposer renders each 4 times
  (num_images_per_prompt=4) at 512x512, 50 steps, guidance 5.0; MoA used the UniPC sampler;
* scores: identity = MTCNN face crop of the generated and of the reference image, FaceNet
  (InceptionResnetV1, VGGFace2) embeddings, cosine similarity clipped at 0, 0 when no face is
  found in the generated image; prompt = CLIP ViT-L/14 image-text cosine similarity with the
  prompt as written for scoring (FastComposer scores the text without its image token).
"""

from __future__ import annotations

from pathlib import Path

from . import prompts as prompt_sets

# FastComposer evaluation/single_object/data.py, IMAGE_TO_GENDER_EVAL (CelebA image ids).
IDENTITIES = {
    "000001": "man",
    "000181": "man",
    "000268": "man",
    "000612": "woman",
    "000667": "woman",
    "001603": "woman",
    "001854": "man",
    "002088": "woman",
    "002464": "woman",
    "002782": "man",
    "002880": "woman",
    "002929": "woman",
    "002937": "woman",
    "003785": "man",
    "004153": "woman",
}

ACCESSORY = [
    "a {} wearing a red hat",
    "a {} wearing a santa hat",
    "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle",
    "a {} in a chef outfit",
    "a {} in a firefighter outfit",
    "a {} in a police outfit",
    "a {} wearing pink glasses",
    "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
]
STYLE = [
    "a painting of a {} in the style of Banksy",
    "a painting of a {} in the style of Vincent Van Gogh",
    "a colorful graffiti painting of a {}",
    "a watercolor painting of a {}",
    "a Greek marble sculpture of a {}",
    "a street art mural of a {}",
    "a black and white photograph of a {}",
    "a pointillism painting of a {}",
    "a Japanese woodblock print of a {}",
    "a street art stencil of a {}",
]
ACTION = [
    "a {} riding a horse",
    "a {} holding a glass of wine",
    "a {} holding a piece of cake",
    "a {} giving a lecture",
    "a {} reading a book",
    "a {} gardening in the backyard",
    "a {} cooking a meal",
    "a {} working out at the gym",
    "a {} walking the dog",
    "a {} baking cookies",
]
CONTEXT = [
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on the beach",
    "a {} on a cobblestone street",
    "a {} on top of pink fabric",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
]
TEMPLATES = ACCESSORY + STYLE + ACTION + CONTEXT  # FastComposer's order (prompt ids 0..39)

# FastComposer's run.py settings; MoA App. D: the UniPC sampler.
SETTINGS = {
    "width": 512,
    "height": 512,
    "steps": 50,
    "cfg": 5.0,
    "sampler": "uni_pc",
    "scheduler": "normal",
    "seeds": [0, 1, 2, 3],
}

# MoA paper App. D, Tab. 3 (single subject): identity preservation (IP), prompt consistency (PC).
PAPER_TABLE = {
    "source": "MoA paper, App. D, Tab. 3 (single subject, CelebA identities)",
    "metrics": ["face", "clip"],
    "rows": {
        "ELITE": (0.228, 0.146),
        "Dreambooth": (0.273, 0.239),
        "Custom-Diffusion": (0.434, 0.233),
        "FastComposer": (0.514, 0.243),
        "Subject-Diffusion": (0.605, 0.228),
        "Mixture-of-Attention": (0.555, 0.202),
    },
}


def reference_image(reference_dir: Path, identity: str) -> Path:
    """FastComposer's choice: the first *.jpg (sorted) in REFERENCE_DIR/<identity>/ (.png also taken)."""
    folder = Path(reference_dir) / identity
    found = sorted(folder.glob("*.jpg")) or sorted(folder.glob("*.png"))
    if not found:
        raise prompt_sets.PromptSetError(
            f"{folder}: no reference image (*.jpg) of identity {identity}; put a "
            "face photo there (CelebA image, as FastComposer's evaluation)"
        )
    return found[0]


def single_subject_prompts(identities: dict[str, str] | None = None) -> list[dict]:
    """The protocol as a prompt set: one row per (identity, prompt)."""
    rows = []
    for case, (identity, word) in enumerate(sorted((identities or IDENTITIES).items())):
        for prompt_id, template in enumerate(TEMPLATES):
            rows.append(
                {
                    "id": f"subject_{case:04d}_prompt_{prompt_id:04d}",
                    "prompt": template.format(word),
                    "source": "fastcomposer-single-subject",
                    "source_id": f"{identity}/{prompt_id}",
                    "subject": identity,
                    "subject_word": word,
                }
            )
    return rows


def add_arguments(parser):
    parser.add_argument("--out", type=Path, required=True, help="the prompt set (.jsonl)")
    parser.add_argument(
        "--identities",
        default=None,
        help="your own test identities instead of FastComposer's: id=word,id=word (folders of REFERENCE_DIR)",
    )


def main(args):
    identities = None
    if args.identities:
        identities = {}
        for pair in args.identities.split(","):
            identity, _, word = pair.strip().partition("=")
            if not identity or not word:
                raise SystemExit(f"error: --identities: {pair!r} is not id=word (e.g. alice=woman)")
            identities[identity] = word
    rows = single_subject_prompts(identities)
    prompt_sets.write_jsonl(rows, args.out)
    print(f"{len(rows)} prompts ({len(rows) // len(TEMPLATES)} identities x {len(TEMPLATES)}) written to {args.out}")
