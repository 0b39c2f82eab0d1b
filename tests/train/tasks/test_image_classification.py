"""lorakit.train.tasks.image_classification: records -> pixel batches, labels, loss and accuracy, for any model
that returns logits."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.train.tasks import make_task
from lorakit.train.tasks.image_classification import ImageClassification
from lorakit.vision.images import image_processor

MEAN, STD = [0.5, 0.25, 0.125], [0.5, 0.5, 0.25]


class MeanPixelClassifier(nn.Module):
    """Logits (N, 2): class 1 when the image's mean pixel value is above 0, else class 0; a linear `classifier`
    as the head."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(1, 2)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.classifier.bias.zero_()

    def forward(self, pixel_values: Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.classifier(pixel_values.mean(dim=(1, 2, 3))[:, None]))


def task(**options) -> ImageClassification:
    return ImageClassification(image_processor(224, MEAN, STD), **options)


def gray(value: int, side: int = 28) -> np.ndarray:
    return np.full((side, side), value, dtype=np.uint8)


def test_gray_image_becomes_three_normalised_channels_at_image_size():
    t = task(image_size=16)
    batch = t.collate(t.encode([{"image": gray(255), "label": "a"}, {"image": gray(0), "label": "b"}]))
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    expected_white = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(batch["pixel_values"][0, :, 5, 5], expected_white)
    assert torch.allclose(batch["pixel_values"][1, :, 5, 5], -torch.tensor(MEAN) / torch.tensor(STD))
    assert batch["labels"].tolist() == [0, 1]


def test_rgb_array_and_gray_array_of_the_same_picture_give_the_same_pixels():
    t = task(image_size=8)
    picture = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    rgb = np.repeat(picture[:, :, None], 3, axis=2)
    batch = t.collate(t.encode([{"image": picture, "label": "0"}, {"image": rgb, "label": "1"}]))
    assert torch.allclose(batch["pixel_values"][0], batch["pixel_values"][1])


def test_image_file_records_are_read_and_grayscale_files_converted(tmp_path):
    path = tmp_path / "digit.png"
    Image.fromarray(gray(200, side=10), mode="L").save(path)
    t = task(image_size=10)
    batch = t.collate(t.encode([{"image": str(path), "label": "x"}, {"image": gray(200, side=10), "label": "y"}]))
    assert torch.allclose(batch["pixel_values"][0], batch["pixel_values"][1])


def test_image_size_defaults_to_the_processors():
    assert task().image_size == 224


def test_numeric_labels_sort_as_numbers():
    t = task()
    records = [{"image": gray(0), "label": str(d)} for d in (10, 2, 1)]
    assert t.fit_labels(records) == ["1", "2", "10"]


def test_rgba_array_is_refused_naming_the_record():
    t = task()
    records = [{"image": gray(0), "label": "0"}, {"image": np.zeros((4, 4, 4), np.uint8), "label": "1"}]
    with pytest.raises(LorakitError, match=r"record 1: image must be 8-bit grayscale .*RGBA"):
        t.encode(records)


def test_label_outside_the_training_labels_is_refused():
    t = task()
    t.encode([{"image": gray(0), "label": "0"}, {"image": gray(0), "label": "1"}])
    with pytest.raises(LorakitError, match=r"record 0: label '7' is not in the label set"):
        t.encode([{"image": gray(0), "label": "7"}])


def test_accuracy_counts_correct_predictions_of_a_logits_model():
    t = task(image_size=8)
    records = [{"image": gray(255), "label": "bright"}, {"image": gray(0), "label": "dark"},
               {"image": gray(255), "label": "dark"}]
    t.labels = ["dark", "bright"]
    metrics = t.evaluate(MeanPixelClassifier(), t.encode(records), batch_size=2)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["predicted_classes"] == 2


def test_loss_has_a_gradient_for_the_head():
    t = task(image_size=8)
    t.labels = ["dark", "bright"]
    model = MeanPixelClassifier()
    t.loss(model, t.collate(t.encode([{"image": gray(255), "label": "dark"}]))).backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0


def test_head_is_the_classifier_and_checks_the_label_count():
    t = task()
    t.labels = ["a", "b", "c"]
    model = MeanPixelClassifier()
    assert t.head_modules(model) == ["classifier"]
    with pytest.raises(LorakitError, match="gives 2 logits but the task has 3 labels"):
        t.loss(model, t.collate(t.encode([{"image": gray(0), "label": "a"}])))


def test_make_task_builds_it_by_name_and_state_rebuilds_it():
    t = make_task("image-classification", image_processor(32, MEAN, STD), labels=["0", "1"], image_size=16)
    assert isinstance(t, ImageClassification)
    state = t.state()
    rebuilt = ImageClassification(image_processor(32, MEAN, STD), **{k: v for k, v in state.items() if k != "task"})
    assert rebuilt.state() == state


def test_a_processor_without_mean_and_std_is_refused():
    with pytest.raises(LorakitError, match="no per-channel image_mean"):
        ImageClassification(object(), image_size=32)


def test_read_records_refuses_a_file_that_is_not_an_mnist_csv():
    with pytest.raises(LorakitError, match=r"reads mnist-5k:train, mnist-5k:test, mnist-5k or an MNIST CSV"):
        task().read_records("photos.jsonl")
