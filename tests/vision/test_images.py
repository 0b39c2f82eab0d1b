"""lorakit.vision.images: reading image files (grayscale converted, non-images refused) and pre-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.errors import LorakitError
from lorakit.vision.images import gray_batch_to_pixel_values, image_processor, read_image, to_pixel_values


def test_grayscale_file_is_read_as_rgb_with_equal_channels(tmp_path):
    path = tmp_path / "g.png"
    Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10), mode="L").save(path)
    image = read_image(path)
    array = np.asarray(image)
    assert image.mode == "RGB" and array.shape == (10, 10, 3)
    assert np.array_equal(array[..., 0], array[..., 2])


def test_a_file_that_is_not_an_image_is_refused_naming_it(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(LorakitError, match=r"notes.png is not an image Pillow can read"):
        read_image(path)


def test_a_missing_file_is_refused():
    with pytest.raises(LorakitError, match=r"image file 'nowhere.png' not found"):
        read_image("nowhere.png")


def test_processor_resizes_and_normalises_to_its_mean_and_std():
    processor = image_processor(8, [0.5] * 3, [0.25] * 3)
    white = Image.fromarray(np.full((20, 30, 3), 255, np.uint8))
    pixels = to_pixel_values([white], processor)
    assert pixels.shape == (1, 3, 8, 8)
    assert torch.allclose(pixels, torch.full_like(pixels, 2.0))


def test_gray_batch_matches_the_processor_on_a_flat_image():
    processor = image_processor(16, [0.3, 0.4, 0.5], [0.2, 0.3, 0.4])
    flat = np.full((28, 28), 77, np.uint8)
    by_processor = to_pixel_values([Image.fromarray(flat, mode="L")], processor)
    by_torch = gray_batch_to_pixel_values(torch.from_numpy(flat)[None], 16, [0.3, 0.4, 0.5], [0.2, 0.3, 0.4])
    assert torch.allclose(by_processor, by_torch, atol=1e-5)
