"""Subject images for MoA's image encoder, made the same way at training and at inference.

FastComposer (github mit-han-lab/fastcomposer, ``fastcomposer/transforms.py``), on which MoA
trains (MoA paper Sec. 4.1: FFHQ "preprocessed by (Xiao et al., 2023)"), builds a subject image
by putting the segment on a random-noise background (``RandomSegmentProcessor``), cropping to
the segment's box, padding the crop to a square with black (``PadToSquare(fill=0)``) and
resizing to 224 (``object_resolution``). A standing person is a tall box: padding keeps the
whole person, head included, where a center crop would keep only the middle of the body.

Images here are channels-last floats in [0, 1], as ComfyUI's IMAGE: (H, W, C) or (B, H, W, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUBJECT_SIZE = 224  # FastComposer's --object_resolution; CLIP ViT-L/14's input size


def pad_to_square(image: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Pad the shorter side by (long - short) // 2 on both ends, as FastComposer's PadToSquare
    (fill 0 = black): nothing is cut off. (..., H, W, C) -> (..., S, S, C), S = max(H, W); an odd
    difference stays one short, as there (the resize that follows makes it square)."""
    h, w = image.shape[-3], image.shape[-2]
    d = abs(h - w) // 2
    # F.pad's pad tuple runs from the last dim backwards: (C), (W), (H).
    pad = (0, 0, d, d, 0, 0) if h > w else (0, 0, 0, 0, d, d)
    return F.pad(image, pad, value=fill) if d else image


def resize_square(image: torch.Tensor, size: int = SUBJECT_SIZE) -> torch.Tensor:
    """(..., S, S, C) -> (..., size, size, C), bilinear with antialiasing (FastComposer's
    T.Resize(..., BILINEAR, antialias=True))."""
    lead = image.shape[:-3]
    x = image.reshape(-1, *image.shape[-3:]).movedim(-1, 1).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.movedim(1, -1).reshape(*lead, size, size, image.shape[-1]).clamp(0, 1).to(image.dtype)


def square_subject(image: torch.Tensor, size: int = SUBJECT_SIZE) -> torch.Tensor:
    """A subject photo as the encoder reads it: padded to a square, then resized."""
    return resize_square(pad_to_square(image), size)


def mask_box(mask: torch.Tensor) -> tuple[slice, slice] | None:
    """The bounding box of mask > 0, (rows, columns) slices; None for an empty mask."""
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    if len(ys) == 0:
        return None
    return slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)


def cut_out(image: torch.Tensor, mask: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The subject (mask > 0) over `background` (the image's shape), cropped to the mask's box:
    (h, w, C). FastComposer's SegmentProcessor with a random-noise background."""
    box = mask_box(mask)
    if box is None:
        raise ValueError("the subject's mask is empty: there is no subject to cut out")
    m = (mask[box] > 0)[..., None]
    return torch.where(m, image[box], background[box])


def noise_background(shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random pixels (FastComposer: torch.randint(0, 255) on uint8 images)."""
    return torch.randint(0, 255, tuple(shape), generator=generator).float() / 255
