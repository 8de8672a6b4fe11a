"""The papers' metrics, each loaded lazily from a maintained package (the `quality` extra):

  hps          HPS v2 (MoLE Tab. 1-3, "HPS (%)"): the HPS v2 checkpoint (xswu/HPSv2 on the
               Hugging Face hub, HPS_v2_compressed.pt) in open-clip-torch's ViT-H-14; score =
               cosine(image, prompt), x100 in the report. This is what the `hpsv2` package's
               img_score.py does; that package (1.2.0) is not used because its wheel lacks its
               tokenizer's vocabulary file (its import fails) and it pins pytest==7.2.0. Unlike it,
               the LAION ViT-H-14 weights are not downloaded: the HPS checkpoint holds all weights.
  imagereward  ImageReward v1.0 (MoLE Tab. 1-3, "IR (%)"), the `image-reward` package's model
               (BLIP ViT-L + BERT + reward head), its normalised reward, x100 in the report.
  clip         prompt consistency (MoA App. D, FastComposer's clip_eval.py): CLIP ViT-L/14
               image-text cosine similarity, transformers' CLIPModel (openai/clip-vit-large-patch14).
  face         identity preservation (MoA App. D, FastComposer's single_object_evaluation.py):
               facenet-pytorch MTCNN finds the faces (FastComposer's settings), the first face of
               the generated image and of the reference are embedded by InceptionResnetV1
               (VGGFace2); score = max(cosine, 0), and 0 when the generated image has no face.

Each metric's weights download at first use into its package's cache (listed in WEIGHTS and in
the README); one that cannot get them stops with MetricUnavailable naming what to download and
where to put it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

WEIGHTS = {
    "hps": "HPS_v2_compressed.pt (1.7 GB) from the Hugging Face repo xswu/HPSv2, into the hub cache "
    "(~/.cache/huggingface/hub, or $HF_HOME/hub): `huggingface-cli download xswu/HPSv2 HPS_v2_compressed.pt`, "
    "or pass --hps-checkpoint FILE",
    "imagereward": "ImageReward.pt (1.7 GB) and med_config.json from the Hugging Face repo THUDM/ImageReward into "
    "~/.cache/ImageReward, and the bert-base-uncased tokenizer into the hub cache: "
    "`huggingface-cli download THUDM/ImageReward ImageReward.pt med_config.json --local-dir "
    "~/.cache/ImageReward` and `huggingface-cli download bert-base-uncased`",
    "clip": "openai/clip-vit-large-patch14 (1.7 GB) into the Hugging Face hub cache: "
    "`huggingface-cli download openai/clip-vit-large-patch14`",
    "face": "20180402-114759-vggface2.pt (107 MB, facenet-pytorch's InceptionResnetV1 VGGFace2 weights) into "
    "$TORCH_HOME/checkpoints (~/.cache/torch/checkpoints); facenet-pytorch downloads it from its GitHub "
    "release at first use. MTCNN's weights ship inside facenet-pytorch",
}
PACKAGES = {
    "hps": "open-clip-torch",
    "imagereward": "image-reward (pip install --no-deps image-reward timm fairscale)",
    "clip": "transformers",
    "face": "facenet-pytorch (pip install --no-deps facenet-pytorch: its pins would replace ComfyUI's torch)",
}


class MetricUnavailable(RuntimeError):
    pass


def _require(module: str, metric: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MetricUnavailable(
            f"metric {metric!r} needs the package {PACKAGES[metric]} ({e}); "
            "install the pack's `quality` extras (README, Measuring quality)"
        ) from None


def _unavailable(metric: str, error: Exception) -> MetricUnavailable:
    return MetricUnavailable(
        f"metric {metric!r} could not load its weights ({type(error).__name__}: {error}). Download {WEIGHTS[metric]}."
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rgb(image):
    from PIL import Image

    return (image if isinstance(image, Image.Image) else Image.open(image)).convert("RGB")


class Metric:
    """score(image, prompt, reference) -> float. `scale` turns the score into the papers' unit."""

    name = ""
    scale = 1.0
    needs_reference = False

    def score(self, image, prompt: str, reference=None) -> float:
        raise NotImplementedError


class ClipScore(Metric):
    """Cosine similarity of CLIP's projected image and text embeddings (FastComposer's
    CLIPEvaluator.txt_to_img_similarity with ViT-L/14; OpenAI's preprocessing: shortest side to
    224 bicubic, centre crop, CLIP mean/std, which CLIPImageProcessor's defaults are)."""

    name = "clip"

    def __init__(self, model, tokenizer, image_processor, device=None):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.tokenizer, self.image_processor = tokenizer, image_processor

    @classmethod
    def load(cls, name: str = "openai/clip-vit-large-patch14", device=None):
        transformers = _require("transformers", "clip")
        try:
            model = transformers.CLIPModel.from_pretrained(name)
            tokenizer = transformers.CLIPTokenizer.from_pretrained(name)
            processor = transformers.CLIPImageProcessor.from_pretrained(name)
        except Exception as e:  # OSError for a missing file; hub errors have many types
            raise _unavailable("clip", e) from None
        return cls(model, tokenizer, processor, device)

    @torch.no_grad()
    def score(self, image, prompt, reference=None):
        text = self.tokenizer([prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
        pixels = self.image_processor(images=_rgb(image), return_tensors="pt")["pixel_values"]
        out = self.model(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            pixel_values=pixels.to(self.device, self.model.dtype),
        )
        # CLIPModel's forward returns both embeddings L2-normalised.
        return float((out.image_embeds.float() * out.text_embeds.float()).sum(-1)[0])


class HPSv2(Metric):
    """HPS v2: the HPS checkpoint's open_clip ViT-H-14, normalised image and text features, their
    dot product (hpsv2/img_score.py: diag(image_features @ text_features.T))."""

    name = "hps"
    scale = 100.0  # MoLE reports "HPS (%)"

    def __init__(self, model, preprocess, tokenizer, device=None):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.preprocess, self.tokenizer = preprocess, tokenizer

    @classmethod
    def build(cls, architecture: str = "ViT-H-14", device=None):
        """The architecture with random weights (no download): what load() fills."""
        open_clip = _require("open_clip", "hps")
        model = open_clip.create_model(architecture, pretrained=None)
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
        return cls(model, preprocess, open_clip.get_tokenizer(architecture), device)

    @classmethod
    def load(cls, checkpoint: str | None = None, version: str = "v2.0", device=None, architecture: str = "ViT-H-14"):
        _require("open_clip", "hps")
        try:  # the weights first: building ViT-H-14 takes a while, and is useless without them
            if checkpoint is None:
                import huggingface_hub

                filename = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}[version]
                checkpoint = huggingface_hub.hf_hub_download("xswu/HPSv2", filename)
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # hub errors have many types; all mean "the weights are not here"
            raise _unavailable("hps", e) from None
        metric = cls.build(architecture, device=device)
        metric.model.load_state_dict(state.get("state_dict", state))
        metric.model.to(metric.device)
        return metric

    @torch.no_grad()
    def score(self, image, prompt, reference=None):
        pixels = self.preprocess(_rgb(image)).unsqueeze(0).to(self.device)
        text = self.tokenizer([prompt]).to(self.device)
        image_features = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_features = torch.nn.functional.normalize(self.model.encode_text(text).float(), dim=-1)
        return float((image_features * text_features).sum(-1)[0])


def imagereward_module():
    """ImageReward's model module (ImageReward/ImageReward.py and its BLIP code) without the
    package's __init__, which also imports its training script (diffusers, datasets) and the
    openai `clip` package, none of which scoring uses."""
    if "ImageReward.ImageReward" in sys.modules:
        return sys.modules["ImageReward.ImageReward"]
    spec = importlib.util.find_spec("ImageReward")
    if spec is None:
        raise MetricUnavailable(f"metric 'imagereward' needs the package {PACKAGES['imagereward']}")
    root = Path(spec.origin).parent
    for name, folder in (("ImageReward", root), ("ImageReward.models", root / "models")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    try:
        return importlib.import_module("ImageReward.ImageReward")
    except ImportError as e:
        import transformers

        hint = ""
        if int(transformers.__version__.split(".")[0]) >= 5:
            # image-reward 1.5's BLIP code (models/BLIP/med.py) imports helpers transformers 5 removed.
            hint = (
                f"; image-reward 1.5 needs transformers<5 (this is {transformers.__version__}): score ImageReward in "
                "an environment with `pip install 'transformers<5' timm fairscale` and `pip install --no-deps "
                "image-reward`"
            )
        raise MetricUnavailable(f"metric 'imagereward' cannot import its model ({e}){hint}") from None


class ImageReward(Metric):
    """ImageReward v1.0's normalised reward (ImageReward.score: BLIP image embedding, the
    prompt's BERT encoding attending to it, the MLP head, (r - mean) / std)."""

    name = "imagereward"
    scale = 100.0  # MoLE reports "IR (%)"

    def __init__(self, model, device=None):
        self.device = device or default_device()
        self.model = model.to(self.device).eval()
        self.model.device = self.device

    @classmethod
    def load(cls, download_root: str | None = None, device=None):
        module = imagereward_module()
        root = Path(download_root or os.path.expanduser("~/.cache/ImageReward"))
        try:
            import huggingface_hub

            checkpoint = huggingface_hub.hf_hub_download("THUDM/ImageReward", "ImageReward.pt", local_dir=root)
            med_config = huggingface_hub.hf_hub_download("THUDM/ImageReward", "med_config.json", local_dir=root)
            model = module.ImageReward(med_config=med_config, device="cpu")  # builds BLIP; fetches bert-base-uncased
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # hub errors have many types; all mean "the weights are not here"
            raise _unavailable("imagereward", e) from None
        model.load_state_dict(state, strict=False)
        return cls(model, device)

    @torch.no_grad()
    def score(self, image, prompt, reference=None):
        return float(self.model.score(prompt, _rgb(image)))


class FaceSimilarity(Metric):
    """FastComposer's identity score (evaluation/single_object/single_object_evaluation.py,
    compute_average_similarity): MTCNN(image_size=160, margin=0, min_face_size=20, thresholds
    0.6/0.7/0.7, factor 0.709, post_process, keep_all) crops the faces, the first face of each
    image is embedded by InceptionResnetV1 (L2-normalised), score = max(cosine, 0); no face in
    the generated image scores 0, no face in the reference is an error."""

    name = "face"
    needs_reference = True

    def __init__(self, detector, embedder, device=None):
        self.device = device or default_device()
        self.detector = detector
        self.embedder = embedder.to(self.device).eval()
        self._references = {}

    @classmethod
    def detector(cls, device=None):
        facenet = _require("facenet_pytorch", "face")
        return facenet.MTCNN(
            image_size=160,
            margin=0,
            min_face_size=20,
            thresholds=[0.6, 0.7, 0.7],
            factor=0.709,
            post_process=True,
            keep_all=True,
            device=device or default_device(),
        )

    @classmethod
    def load(cls, device=None):
        facenet = _require("facenet_pytorch", "face")
        try:
            embedder = facenet.InceptionResnetV1(pretrained="vggface2")
        except Exception as e:  # a failed download raises URLError, HTTPError, OSError...
            raise _unavailable("face", e) from None
        return cls(cls.detector(device), embedder, device)

    @torch.no_grad()
    def _embed(self, image):
        faces = self.detector(_rgb(image))
        if faces is None:
            return None
        return self.embedder(faces[:1].to(self.device).reshape(1, 3, 160, 160)).float()

    def reference_embedding(self, reference):
        """Embedded once per reference file (a run compares thousands of images with 15 references)."""
        key = str(reference) if isinstance(reference, (str, Path)) else None
        if key in self._references:
            return self._references[key]
        embedding = self._embed(reference)
        if embedding is None:
            raise ValueError(
                f"{reference}: no face found in the reference image (MTCNN); use a photo with a clear, frontal face"
            )
        if key is not None:
            self._references[key] = embedding
        return embedding

    def score(self, image, prompt=None, reference=None):
        if reference is None:
            raise ValueError("the face metric needs the subject's reference image")
        wanted = self.reference_embedding(reference)
        found = self._embed(image)
        if found is None:
            return 0.0
        return max(float((found * wanted).sum(-1)[0]), 0.0)


LOADERS = {"hps": HPSv2.load, "imagereward": ImageReward.load, "clip": ClipScore.load, "face": FaceSimilarity.load}
SCALES = {"hps": HPSv2.scale, "imagereward": ImageReward.scale, "clip": 1.0, "face": 1.0}
LABELS = {"hps": "HPS (%)", "imagereward": "IR (%)", "clip": "PC (CLIP-L/14)", "face": "IP (FaceNet)"}


def load(name: str, device=None, **options) -> Metric:
    if name not in LOADERS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(LOADERS)}")
    return LOADERS[name](device=device, **options)
