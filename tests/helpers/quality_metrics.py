"""The quality metrics (quality.metrics) on randomly initialised models of their architectures,
built from the packages' own configs and code without downloading anything:

    tiny_clip()      transformers CLIPModel from a tiny CLIPConfig (1 layer, width 32; the real
                     ViT-L/14 is 428M parameters), ComfyUI's copy of the CLIP BPE vocabulary
                     (comfy/sd1_tokenizer: the tokenizer of openai/clip-vit-large-patch14) and
                     CLIPImageProcessor's defaults (OpenAI's preprocessing)
    tiny_hps()       open_clip's CLIP from a tiny model config registered with open_clip (the real
                     ViT-H-14 is 986M parameters), open_clip's own tokenizer and eval transform
    random_face()    facenet-pytorch's MTCNN with its real, shipped weights and a randomly
                     initialised InceptionResnetV1 (its VGGFace2 weights are a download)
    face_photo()     a real face photo shipped with matplotlib (grace_hopper.jpg), for MTCNN
"""

from __future__ import annotations

import json
from pathlib import Path

import hostenv
import pytest
import torch

from quality import metrics

HPS_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CPU = torch.device("cpu")


def tiny_clip() -> metrics.ClipScore:
    transformers = pytest.importorskip("transformers")
    host, reason = hostenv.find_host()
    if host is None:
        pytest.skip(reason)
    vocab = host / "comfy" / "sd1_tokenizer"
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
        },
        vision_config={
            "image_size": 224,
            "patch_size": 32,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    tokenizer = transformers.CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"))
    return metrics.ClipScore(transformers.CLIPModel(config), tokenizer, transformers.CLIPImageProcessor(), CPU)


def register_tiny_hps(folder: Path) -> str:
    open_clip = pytest.importorskip("open_clip")
    path = Path(folder) / "hps-tiny-test.json"
    path.write_text(json.dumps(HPS_TINY))
    open_clip.add_model_config(path)
    return "hps-tiny-test"


def tiny_hps(folder: Path) -> metrics.HPSv2:
    name = register_tiny_hps(folder)
    torch.manual_seed(0)
    return metrics.HPSv2.build(name, device=CPU)


def random_face() -> metrics.FaceSimilarity:
    facenet = pytest.importorskip("facenet_pytorch")
    torch.manual_seed(0)
    return metrics.FaceSimilarity(metrics.FaceSimilarity.detector(CPU), facenet.InceptionResnetV1(pretrained=None), CPU)


def face_photo() -> Path:
    cbook = pytest.importorskip("matplotlib.cbook")
    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
