"""Reading images and turning them into a model's input, as the model was trained.

    processor = image_processor(size=224, mean=EFFICIENTNET_MEAN, std=EFFICIENTNET_STD)
    pixels = to_pixel_values([read_image("cat.jpg")], processor)   # (1, 3, 224, 224) float32

A grayscale image (mode L, or an MNIST array (H, W)) is converted to RGB by repeating its one channel three times,
which is what an RGB-trained model expects; RGBA and palette images are converted to RGB by Pillow (alpha dropped).
A file that is not an image is refused in one line naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from transformers import ViTImageProcessorPil

from lorakit.errors import LorakitError


def image_processor(size: int, mean: list[float], std: list[float], *, resample: int = Image.Resampling.BICUBIC
                    ) -> ViTImageProcessorPil:
    """A transformers image processor: resize to `size` x `size`, rescale to [0, 1], normalise per channel with
    `mean` and `std` (on the [0, 1] scale); its `save_pretrained` writes the settings beside a model."""
    return ViTImageProcessorPil(do_resize=True, size={"height": size, "width": size}, resample=resample,
                             do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(mean),
                             image_std=list(std))


def read_image(path: str | Path) -> Image.Image:
    """The image file at `path` as an RGB Pillow image (grayscale and RGBA converted; see the module docstring).

    Raises LorakitError when the file is missing or is not an image Pillow can decode."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"image file {str(path)!r} not found")
    try:
        with Image.open(path) as image:
            image.load()
            return as_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # Pillow raises SyntaxError on some bad headers
        raise LorakitError(f"{path} is not an image Pillow can read ({type(e).__name__}: {e}); give a PNG, JPEG, "
                           "BMP, GIF or TIFF file") from None


def as_rgb(image: Image.Image) -> Image.Image:
    """`image` in mode RGB: one gray channel repeated three times, alpha dropped, palettes expanded."""
    return image if image.mode == "RGB" else image.convert("RGB")


def to_pixel_values(images: list[Image.Image], processor: ViTImageProcessorPil) -> Tensor:
    """(N, 3, H, W) float32 model input for RGB Pillow images, by `processor`."""
    out = processor(images=[as_rgb(im) for im in images], return_tensors="pt")
    return out["pixel_values"].float()


def gray_batch_to_pixel_values(gray: Tensor, size: int, mean: list[float], std: list[float]) -> Tensor:
    """(N, 3, size, size) float32 model input for a batch of grayscale uint8 images `gray` (N, H, W): gray
    repeated as RGB, resized, rescaled to [0, 1] and normalised with the per-channel `mean` and `std` (a
    processor's `image_mean`, `image_std`), in torch on the whole batch. Bilinear resizing with antialiasing:
    close to, not bit-equal with, a processor's Pillow resize."""
    if gray.dim() != 3:
        raise LorakitError(f"expected grayscale images (N, H, W), got shape {tuple(gray.shape)}")
    x = gray.float().unsqueeze(1) / 255.0  # (N, 1, H, W) in [0, 1]
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.expand(-1, 3, -1, -1)  # (N, 3, size, size): gray as RGB
    mean_t = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t

