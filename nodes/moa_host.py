"""MoA's host adapters: the CLIP vision check, the SD1.5 tokenizer's vocabulary, time lapse's token
embeddings and the subject images' embeddings, on ComfyUI's own CLIP and CLIP vision objects.

Used by MoA Subject Inject (nodes/moa_inject.py) and by MoA training (training/moa_train.py),
which imports this module, not the node UI files.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict

import torch

from ..mixture_core.moa import timelapse_tokens
from ..mixture_core.subject_images import square_subject
from ..mixture_core.subjects import SubjectWord, Vocabulary

# The image encoder MoA files are made for (moa.image_encoder = "clip-vit-l-14"): OpenAI CLIP
# ViT-L/14 at 224 px, whose projected CLS embedding is 768 wide.
VIT_L14 = {"hidden size": 1024, "patch": 14, "projection": 768, "layers": 24, "image size": 224}


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
        raise ValueError(
            "clip_vision: MoA needs a CLIP vision model (CLIP ViT-L/14, loaded with Load CLIP Vision); "
            f"the connected value is a {type(clip_vision).__name__} without a CLIP vision tower and projection"
        ) from None
    if found != VIT_L14 or not is_clip:
        want = ", ".join(f"{k} {v}" for k, v in VIT_L14.items())
        got = ", ".join(f"{k} {v}" for k, v in found.items())
        raise ValueError(
            f"clip_vision: MoA encodes subjects with CLIP ViT-L/14 ({want}); the connected model has {got}"
            f"{'' if is_clip else ' and no class token (not CLIP)'}. Load the CLIP ViT-L/14 vision model "
            "(OpenAI clip-vit-large-patch14) with Load CLIP Vision."
        )
    if image_dim != VIT_L14["projection"]:
        raise ValueError(
            f"the MoA file's fusion reads {image_dim}-wide image embeddings, CLIP ViT-L/14 gives {VIT_L14['projection']}"
        )


def sd1_vocabulary(clip) -> tuple[Vocabulary, object, str]:
    """(the Vocabulary of an SD1.5 CLIP's tokenizer, that tokenizer, the key of its tokens)."""
    tokenizer = getattr(clip, "tokenizer", None)
    name, key = getattr(tokenizer, "clip", None), getattr(tokenizer, "clip_name", None)
    inner = getattr(tokenizer, name, None) if isinstance(name, str) else None
    if inner is None or not hasattr(inner, "inv_vocab") or key != "l":
        raise ValueError(
            f"clip: MoA needs the SD1.5 text encoder (CLIP ViT-L/14); the connected CLIP has a "
            f"{type(tokenizer).__name__} tokenizer"
        )

    def word_ids(word: str) -> list[int]:
        ids = inner.tokenizer(word)["input_ids"]
        if inner.start_token is not None and ids and ids[0] == inner.start_token:
            ids = ids[1:]
        if inner.end_token is not None and ids and ids[-1] == inner.end_token:
            ids = ids[:-1]
        return ids

    return Vocabulary(word_ids, inner.inv_vocab, frozenset({inner.start_token, inner.end_token})), inner, key


def collect_images(images: list[tuple[str, torch.Tensor | None]]) -> list[tuple[str, torch.Tensor]]:
    """The connected image inputs in order, each checked to hold at least one image."""
    out = []
    for name, image in images:
        if image is None:
            continue
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError(
                f"{name}: expected an IMAGE (batch, height, width, channels), not {getattr(image, 'shape', type(image))}"
            )
        if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(
                f"{name} is empty (an image batch of shape {tuple(image.shape)}); connect the subject's image"
            )
        out.append((name, image))
    return out


def token_embedding_table(clip) -> torch.Tensor:
    tokenizer = clip.tokenizer
    encoder = getattr(clip.cond_stage_model, tokenizer.clip)
    return encoder.transformer.get_input_embeddings().weight


def apply_timelapse(clip, vocab: Vocabulary, key, tokens, subject: SubjectWord, position: int, word: str, alpha: float):
    """Tokens whose subject token (at `position` of the first chunk) is replaced by the input
    token embedding alpha of the way from the subject word's to `word`'s."""
    source = vocab.word_ids(subject.word)
    target = vocab.word_ids(word.strip())
    if len(source) != 1:
        raise ValueError(
            f"timelapse: the subject word {subject.word!r} is {len(source)} CLIP tokens; time lapse interpolates "
            "one token, so it needs a single-token subject word"
        )
    if len(target) != 1:
        raise ValueError(
            f"timelapse_word {word!r} is {len(target)} CLIP tokens; time lapse needs a single-token word (such as 'kid')"
        )
    table = token_embedding_table(clip)
    mixed = timelapse_tokens(table[source[0]].detach().float().cpu(), table[target[0]].detach().float().cpu(), alpha)
    out = {k: [list(chunk) for chunk in chunks] for k, chunks in tokens.items()}
    entry = out[key][0][position]
    out[key][0][position] = (mixed,) + tuple(entry[1:])
    return out


class SubjectEmbeddingCache:
    """The last image embeddings, per (CLIP vision model, image content): a graph that swaps prompts
    or subjects over the same photos (the couples figure runs seven samplers over two faces) encodes
    each photo once, not once per MoA Subject Inject (~1 s each for ViT-L/14 on a CPU). The model is
    held weakly and compared by identity, so a freed model's reused id never hits."""

    def __init__(self, size: int = 32):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.encoded = 0  # encoder calls made, for tests and logs

    @staticmethod
    def key(clip_vision, image: torch.Tensor) -> tuple:
        data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
        return id(clip_vision), tuple(image.shape), hashlib.blake2b(data, digest_size=16).hexdigest()

    def embed(self, clip_vision, image: torch.Tensor) -> torch.Tensor:
        key = self.key(clip_vision, image)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is clip_vision:
            self.entries.move_to_end(key)
            return hit[1]
        with torch.no_grad():  # as ComfyUI runs nodes (inference mode): no autograd graph through the encoder
            square = square_subject(image, clip_vision.image_size)
            embedding = clip_vision.encode_image(square).image_embeds.float().cpu()
        self.encoded += 1
        self.entries[key] = (weakref.ref(clip_vision), embedding)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return embedding


SUBJECT_EMBEDDINGS = SubjectEmbeddingCache()


def encode_subject_images(clip_vision, images: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """(n, 768) projected CLS embeddings of every image, input by input, in order. Each image is
    padded to a square first, as MoA's training and FastComposer make subject images
    (mixture_core.subject_images): a full-body photo keeps its head, which the encoder's center
    crop would cut off. The CLIP normalization that follows is the clip_vision model's own."""
    return torch.cat([SUBJECT_EMBEDDINGS.embed(clip_vision, image) for _, image in images])
