"""The model's image transform, identical to upstream `blip2_image_eval` (= `blip2_image_train`), spec §1.5.

RGB -> square bicubic resize with PIL (what torchvision 0.15 `Resize((S, S), BICUBIC)` does on a PIL image) ->
`ToTensor` (uint8 / 255 in float32) -> `Normalize` with the CLIP mean and std. No torchvision needed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from SlicerMiniGPTPancreas.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageInputError(UserError, ValueError):
    """The object given as an image cannot be turned into the model's input."""


def preprocess_image(image: Image.Image | np.ndarray, image_size: int = 448) -> torch.Tensor:
    """Return the model input `[3, image_size, image_size]` float32 for one image.

    `image` is a PIL image of any mode (converted to RGB like upstream's `Image.open(p).convert('RGB')`, which
    drops an alpha channel) or a uint8 numpy array `[H, W]`, `[H, W, 3]` or `[H, W, 4]`.
    The resize does not keep the aspect ratio, as upstream's does not.
    """
    pil = _as_pil(image).convert("RGB")
    if pil.size != (image_size, image_size):
        pil = pil.resize((image_size, image_size), resample=Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy())  # [S, S, 3] uint8
    pixels = pixels.permute(2, 0, 1).to(torch.float32).div(255)  # [3, S, S] in [0, 1]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub(mean).div(std)


def preprocess_images(images: list[Image.Image | np.ndarray], image_size: int = 448) -> torch.Tensor:
    """Stack several images into `[B, 3, image_size, image_size]`."""
    if not images:
        raise ImageInputError("no images given; pass at least one image.")
    return torch.stack([preprocess_image(image, image_size) for image in images])


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageInputError(
                f"numpy images must be uint8 (0-255), got {image.dtype}; "
                "use SlicerMiniGPTPancreas.preprocess to turn a CT slice into the 8-bit image the model expects."
            )
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4)):
            return Image.fromarray(image)
        raise ImageInputError(f"numpy images must be [H, W], [H, W, 3] or [H, W, 4], got shape {image.shape}.")
    raise ImageInputError(f"expected a PIL image or a uint8 numpy array, got {type(image).__name__}.")
