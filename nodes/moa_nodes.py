"""Load MoA Router and MoA Subject Inject.

Load MoA Router reads a MoA file (models/moa) into a MOA_WEIGHTS value. MoA Subject Inject
binds subject images to words of the prompt and returns the patched MODEL (see moa_patch)
and the prompt's CONDITIONING, encoded exactly as CLIPTextEncode encodes it.

Everything is checked before the model is cloned: a bad input raises a ValueError naming
the input (or the file) and nothing is applied.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..mixture_core.errors import WeightFileError
from ..mixture_core.moa import MoAModel, SubjectBinding, morph_embeddings, timelapse_tokens
from ..mixture_core.moa_files import check_against_model, load_moa_file
from .model_folders import files_in, full_path
from .moa_patch import MoASettings, apply_moa, attention_shapes
from .unet_layers import model_family

log = logging.getLogger(__name__)

MoAWeights = io.Custom("MOA_WEIGHTS")
# The image encoder MoA files are made for (moa.image_encoder = "clip-vit-l-14"): OpenAI CLIP
# ViT-L/14 at 224 px, whose projected CLS embedding is 768 wide.
VIT_L14 = {"hidden size": 1024, "patch": 14, "projection": 768, "layers": 24, "image size": 224}


@dataclass(frozen=True)
class LoadedMoA:
    """The value on a MOA_WEIGHTS wire."""

    path: str
    model: MoAModel


def load_router(filename: str) -> LoadedMoA:
    path = full_path("moa", filename)
    return LoadedMoA(path, load_moa_file(path))


# ---- checks ----------------------------------------------------------------------------------


def check_moa_fits(model, moa: LoadedMoA) -> None:
    """The MoA file against the model's attention layers: same base family, every layer the
    file holds exists in the model with the same widths (WeightFileError naming the file)."""
    expected = attention_shapes(model)
    check_against_model(moa.model, expected, model_family(model), moa.path)
    text_dims = {context for layer_id, (_, context) in expected.items() if layer_id.endswith("attn2")}
    if text_dims and moa.model.fusion.text_dim not in text_dims:
        raise WeightFileError(moa.path, f"its fusion reads {moa.model.fusion.text_dim}-wide text tokens, this model's "
                                        f"cross-attention context is {sorted(text_dims)} wide")


def check_clip_vision(clip_vision, image_dim: int) -> None:
    """clip_vision must be CLIP ViT-L/14 (224 px) with its 768-wide projection."""
    try:
        model = clip_vision.model
        vision = model.vision_model
        patch = vision.embeddings.patch_embedding.weight
        found = {
            "hidden size": int(patch.shape[0]),
            "patch": int(patch.shape[-1]),
            "projection": int(model.visual_projection.weight.shape[0]),
            "layers": len(vision.encoder.layers),
            "image size": int(clip_vision.image_size),
        }
        is_clip = vision.embeddings.class_embedding is not None
    except (AttributeError, TypeError):
        raise ValueError("clip_vision: MoA needs a CLIP vision model (CLIP ViT-L/14, loaded with Load CLIP Vision); "
                         f"the connected value is a {type(clip_vision).__name__} without a CLIP vision tower and projection") from None
    if found != VIT_L14 or not is_clip:
        want = ", ".join(f"{k} {v}" for k, v in VIT_L14.items())
        got = ", ".join(f"{k} {v}" for k, v in found.items())
        raise ValueError(f"clip_vision: MoA encodes subjects with CLIP ViT-L/14 ({want}); the connected model has {got}"
                         f"{'' if is_clip else ' and no class token (not CLIP)'}. Load the CLIP ViT-L/14 vision model "
                         "(OpenAI clip-vit-large-patch14) with Load CLIP Vision.")
    if image_dim != VIT_L14["projection"]:
        raise ValueError(f"the MoA file's fusion reads {image_dim}-wide image embeddings, CLIP ViT-L/14 gives {VIT_L14['projection']}")


_SUBJECT = re.compile(r"^(?P<word>.*?)(?:#(?P<occurrence>\d+))?$")


@dataclass(frozen=True)
class SubjectWord:
    text: str  # as the user wrote it, for messages: "person#2"
    word: str  # "person"
    occurrence: int | None  # 2, or None: the word must occur once


def parse_subject_words(spec: str) -> list[SubjectWord]:
    """ "man, woman#2" -> subjects in order. Each entry is a word (or a phrase) of the prompt,
    optionally with #k to pick its k-th occurrence."""
    if not spec.strip():
        raise ValueError("subject_words is empty: name the prompt's word of each subject, such as 'man, woman'")
    subjects = []
    for raw in spec.split(","):
        entry = raw.strip()
        m = _SUBJECT.match(entry)
        word = m["word"].strip()
        if not word:
            raise ValueError(f"subject_words {spec!r}: an entry is empty; separate the subject words with commas, such as 'man, woman'")
        occurrence = int(m["occurrence"]) if m["occurrence"] is not None else None
        if occurrence is not None and occurrence < 1:
            raise ValueError(f"subject_words: {entry!r}: occurrences count from 1 ({word}#1 is the first)")
        subjects.append(SubjectWord(entry, word, occurrence))
    return subjects


def parse_weights(spec, count: int) -> list[float]:
    """ "1.0, 0.8" -> one weight per subject; one number applies to all; empty: all 1."""
    if isinstance(spec, (int, float)):
        values = [float(spec)]
    elif not str(spec).strip():
        values = [1.0]
    else:
        try:
            values = [float(x) for x in str(spec).split(",")]
        except ValueError:
            raise ValueError(f"subject_weights {spec!r}: give numbers separated by commas, such as '1.0, 0.8'") from None
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise ValueError(f"subject_weights {spec!r} gives {len(values)} weights for {count} subjects; give one per subject or a single one for all")
    bad = [v for v in values if not (v >= 0.0) or v == float("inf")]
    if bad:
        raise ValueError(f"subject_weights {spec!r}: weights must be finite and >= 0 (0 = plain text token, 1 = fully fused)")
    return values


def sd1_tokenizer(clip):
    """(the SD1 tokenizer, the key of its tokens) of an SD1.5 CLIP (ViT-L/14 text encoder)."""
    tokenizer = getattr(clip, "tokenizer", None)
    name, key = getattr(tokenizer, "clip", None), getattr(tokenizer, "clip_name", None)
    inner = getattr(tokenizer, name, None) if isinstance(name, str) else None
    if inner is None or not hasattr(inner, "inv_vocab") or key != "l":
        raise ValueError(f"clip: MoA needs the SD1.5 text encoder (CLIP ViT-L/14); the connected CLIP has a "
                         f"{type(tokenizer).__name__} tokenizer")
    return inner, key


def word_tokens(tokenizer, word: str) -> list[int]:
    ids = tokenizer.tokenizer(word)["input_ids"]
    if tokenizer.start_token is not None and ids and ids[0] == tokenizer.start_token:
        ids = ids[1:]
    if tokenizer.end_token is not None and ids and ids[-1] == tokenizer.end_token:
        ids = ids[:-1]
    return ids


def find_subject_tokens(tokenizer, chunks, subjects: list[SubjectWord]) -> list[int]:
    """The position in the first 77-token chunk of each subject's word: its last token for a
    word CLIP splits into several tokens. A word is matched whole (a token sequence starting
    at a word start and ending at a word end: 'man' does not match 'woman' or 'superman')."""
    inv = tokenizer.inv_vocab
    specials = {tokenizer.start_token, tokenizer.end_token}

    def is_int(t):
        return isinstance(t, int) and not isinstance(t, bool)

    def starts_word(chunk, i):
        if i == 0:
            return True
        prev = chunk[i - 1][0]
        return not is_int(prev) or prev in specials or inv.get(prev, "").endswith("</w>")

    positions = []
    for subject in subjects:
        ids = word_tokens(tokenizer, subject.word)
        if not ids:
            raise ValueError(f"subject_words: {subject.text!r} has no CLIP tokens")
        found = []  # (chunk, position of the last token)
        for c, chunk in enumerate(chunks):
            tokens = [entry[0] for entry in chunk]
            for i in range(len(tokens) - len(ids) + 1):
                if all(is_int(tokens[i + j]) and tokens[i + j] == ids[j] for j in range(len(ids))) and starts_word(chunk, i):
                    found.append((c, i + len(ids) - 1))
        if not found:
            raise ValueError(f"subject_words: {subject.word!r} is not a word of the prompt; each subject word must appear in the prompt")
        if subject.occurrence is None:
            if len(found) > 1:
                raise ValueError(f"subject_words: {subject.word!r} occurs {len(found)} times in the prompt; say which one with "
                                 f"an occurrence index, such as '{subject.word}#1' or '{subject.word}#2'")
            chunk, position = found[0]
        else:
            if subject.occurrence > len(found):
                raise ValueError(f"subject_words: {subject.text!r} asks for occurrence {subject.occurrence}, but "
                                 f"{subject.word!r} occurs {len(found)} time(s) in the prompt")
            chunk, position = found[subject.occurrence - 1]
        if chunk > 0:
            raise ValueError(f"subject_words: {subject.text!r} is beyond the prompt's first 77 tokens; MoA binds subjects "
                             "in the first 77-token chunk only: move the subject earlier or shorten the prompt")
        positions.append(position)
    for i, a in enumerate(positions):
        for j in range(i):
            if positions[j] == a:
                raise ValueError(f"subject_words: {subjects[j].text!r} and {subjects[i].text!r} are the same word of the prompt; "
                                 "bind each subject to its own word")
    return positions


def collect_images(images: list[tuple[str, torch.Tensor | None]]) -> list[tuple[str, torch.Tensor]]:
    """The connected image inputs in order, each checked to hold at least one image."""
    out = []
    for name, image in images:
        if image is None:
            continue
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError(f"{name}: expected an IMAGE (batch, height, width, channels), not {getattr(image, 'shape', type(image))}")
        if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"{name} is empty (an image batch of shape {tuple(image.shape)}); connect the subject's image")
        out.append((name, image))
    return out


def token_embedding_table(clip) -> torch.Tensor:
    tokenizer = clip.tokenizer
    encoder = getattr(clip.cond_stage_model, tokenizer.clip)
    return encoder.transformer.get_input_embeddings().weight


def apply_timelapse(clip, tokenizer, key, tokens, subject: SubjectWord, position: int, word: str, alpha: float):
    """Tokens whose subject token (at `position` of the first chunk) is replaced by the input
    token embedding alpha of the way from the subject word's to `word`'s."""
    source = word_tokens(tokenizer, subject.word)
    target = word_tokens(tokenizer, word.strip())
    if len(source) != 1:
        raise ValueError(f"timelapse: the subject word {subject.word!r} is {len(source)} CLIP tokens; time lapse interpolates "
                         "one token, so it needs a single-token subject word")
    if len(target) != 1:
        raise ValueError(f"timelapse_word {word!r} is {len(target)} CLIP tokens; time lapse needs a single-token word (such as 'kid')")
    table = token_embedding_table(clip)
    mixed = timelapse_tokens(table[source[0]].detach().float().cpu(), table[target[0]].detach().float().cpu(), alpha)
    out = {k: [list(chunk) for chunk in chunks] for k, chunks in tokens.items()}
    entry = out[key][0][position]
    out[key][0][position] = (mixed,) + tuple(entry[1:])
    return out


def encode_subject_images(clip_vision, images: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """(n, 768) projected CLS embeddings of every image, input by input, in order. Each image is
    padded to a square first, as MoA's training makes subject images (mixture_core.subject_images):
    a full-body photo keeps its head, which the encoder's center crop would cut off."""
    from ..mixture_core.subject_images import square_subject

    embeddings = []
    with torch.no_grad():  # as ComfyUI runs nodes (inference mode): no autograd graph through the encoder
        for _, image in images:
            embeddings.append(clip_vision.encode_image(square_subject(image, clip_vision.image_size)).image_embeds.float().cpu())
    return torch.cat(embeddings)


def inject(
    model,
    moa: LoadedMoA,
    clip,
    clip_vision,
    text: str,
    subject_words: str,
    images: list[tuple[str, torch.Tensor | None]],
    subject_weights="",
    strength: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    morph_image: torch.Tensor | None = None,
    morph: float = 0.0,
    timelapse_word: str = "",
    timelapse: float = 0.0,
    edit_subject: int = 1,
):
    """(patched model, conditioning). Every check runs before the model is cloned."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], not {strength}")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy 0 <= start <= end <= 1")
    for name, value in (("morph", morph), ("timelapse", timelapse)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], not {value}")
    if not isinstance(moa, LoadedMoA):
        raise ValueError(f"moa: expected the output of Load MoA Router, not a {type(moa).__name__}")
    check_moa_fits(model, moa)
    check_clip_vision(clip_vision, moa.model.fusion.image_dim)

    subjects = parse_subject_words(subject_words)
    weights = parse_weights(subject_weights, len(subjects))
    connected = collect_images(images)
    n_images = sum(image.shape[0] for _, image in connected)
    if n_images != len(subjects):
        shown = ", ".join(f"{name}: {image.shape[0]}" for name, image in connected) or "none connected"
        raise ValueError(f"subject images: {n_images} image(s) ({shown}) for {len(subjects)} subject word(s) "
                         f"({', '.join(s.text for s in subjects)}); give exactly one image per subject word, in word order")
    if not 1 <= edit_subject <= len(subjects):
        raise ValueError(f"edit_subject {edit_subject}: there are {len(subjects)} subjects (1..{len(subjects)})")
    if morph > 0 and morph_image is None:
        raise ValueError(f"morph is {morph} but no morph_image is connected")
    if morph_image is not None:
        (_, morph_image), = collect_images([("morph_image", morph_image)])
        if morph_image.shape[0] != 1:
            raise ValueError(f"morph_image holds {morph_image.shape[0]} images; give the one image to morph towards")
    if timelapse > 0 and not timelapse_word.strip():
        raise ValueError(f"timelapse is {timelapse} but timelapse_word is empty; name the word to move towards (such as 'kid')")

    tokenizer, key = sd1_tokenizer(clip)
    tokens = clip.tokenize(text)
    positions = find_subject_tokens(tokenizer, tokens[key], subjects)
    edited = edit_subject - 1
    if timelapse > 0:
        tokens = apply_timelapse(clip, tokenizer, key, tokens, subjects[edited], positions[edited], timelapse_word, timelapse)
    conditioning = clip.encode_from_tokens_scheduled(tokens)
    text_width = conditioning[0][0].shape[-1]
    if text_width != moa.model.fusion.text_dim:
        raise ValueError(f"clip: its text embedding is {text_width} wide, the MoA file's fusion reads {moa.model.fusion.text_dim}")

    if strength == 0.0:
        return model.clone(), conditioning  # the router forced to the prior: the model as it is

    embeddings = encode_subject_images(clip_vision, connected)
    if morph > 0:
        target = encode_subject_images(clip_vision, [("morph_image", morph_image)])[0]
        embeddings[edited] = morph_embeddings(embeddings[edited], target, morph)
    bindings = [SubjectBinding(p, embeddings[i], weights[i]) for i, p in enumerate(positions)]
    bound_text = conditioning[0][0][0, positions].detach().float().cpu()
    model_sampling = model.get_model_object("model_sampling")
    settings = MoASettings(
        strength=float(strength),
        sigma_start=float(model_sampling.percent_to_sigma(start_percent)),
        sigma_end=float(model_sampling.percent_to_sigma(end_percent)),
        bindings=bindings,
        bound_text=bound_text,
        model_sampling=model_sampling,
    )
    log.info("MoA: subjects %s at tokens %s", [s.text for s in subjects], positions)
    return apply_moa(model, moa.model, settings), conditioning


# ---- nodes -----------------------------------------------------------------------------------


class LoadMoARouter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoA_LoadRouter",
            display_name="Load MoA Router",
            category="MoA",
            description="Loads a MoA file from models/moa: the personalized attentions, the routers that mix them with "
            "the model's own attention per pixel, and the fusion of subject images into prompt tokens.",
            inputs=[io.Combo.Input("moa_name", options=files_in("moa"), tooltip="MoA file (.safetensors) in models/moa")],
            outputs=[MoAWeights.Output(display_name="moa")],
        )

    @classmethod
    def execute(cls, moa_name) -> io.NodeOutput:
        return io.NodeOutput(load_router(moa_name))


class MoASubjectInject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MoA_SubjectInject",
            display_name="MoA Subject Inject",
            category="MoA",
            description="Personalizes the model with MoA: each subject image is bound to a word of the prompt. Returns the "
            "patched model and the prompt's conditioning (as CLIP Text Encode makes it): wire both to the sampler.",
            inputs=[
                io.Model.Input("model"),
                MoAWeights.Input("moa", tooltip="From Load MoA Router"),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP (SD1.5)"),
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-L/14 vision model (Load CLIP Vision)"),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default="a man and a woman dancing in Paris",
                                tooltip="The prompt; it must contain every subject word"),
                io.String.Input("subject_words", default="man, woman",
                                tooltip="The prompt word of each subject, comma-separated, in the order of the images. "
                                "word#k picks the k-th occurrence of a word that occurs more than once"),
                io.Image.Input("image_1", tooltip="Subject image(s). The subject images are image_1's, then image_2's, ... "
                               "in order (a batch counts as several): one per subject word"),
                io.String.Input("subject_weights", default="1.0",
                                tooltip="Per-subject weight of the image in its token (0 = text only, 1 = fully fused), "
                                "comma-separated, or one number for all"),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Personalization: scales the router's weight of the personalized attention; "
                               "0 returns the model unchanged"),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="MoA acts from this point of sampling (the model's own attention only before)"),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="MoA acts until this point of sampling (the model's own attention only after)"),
                io.Image.Input("image_2", optional=True),
                io.Image.Input("image_3", optional=True),
                io.Image.Input("image_4", optional=True),
                io.Int.Input("edit_subject", default=1, min=1, max=16, optional=True,
                             tooltip="The subject (1 = the first word) that morph and time lapse act on"),
                io.Image.Input("morph_image", optional=True,
                               tooltip="Subject morphing: an image of a second subject to morph the edited subject towards"),
                io.Float.Input("morph", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="0 = the subject's image, 1 = morph_image's, between: morphed image embeddings"),
                io.String.Input("timelapse_word", default="", optional=True,
                                tooltip="Time lapse: a one-token word (such as 'kid') to move the edited subject's word towards"),
                io.Float.Input("timelapse", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="0 = the subject word, 1 = timelapse_word: interpolated token embeddings"),
            ],
            outputs=[io.Model.Output(), io.Conditioning.Output(display_name="positive")],
        )

    @classmethod
    def execute(cls, model, moa, clip, clip_vision, text, subject_words, image_1, subject_weights, strength, start_percent,
                end_percent, image_2=None, image_3=None, image_4=None, edit_subject=1, morph_image=None, morph=0.0,
                timelapse_word="", timelapse=0.0) -> io.NodeOutput:
        images = [("image_1", image_1), ("image_2", image_2), ("image_3", image_3), ("image_4", image_4)]
        patched, conditioning = inject(model, moa, clip, clip_vision, text, subject_words, images, subject_weights, strength,
                                       start_percent, end_percent, morph_image, morph, timelapse_word, timelapse, edit_subject)
        return io.NodeOutput(patched, conditioning)


NODES = [LoadMoARouter, MoASubjectInject]
