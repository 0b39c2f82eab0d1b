"""Image classification: one image -> one label, for any image model that returns logits (EfficientNet-Lite0,
transformers' `...ForImageClassification` such as DINOv2's).

    task = ImageClassification(processor, image_size=64)   # processor: the model's image processor (mean, std)
    train = task.encode(mnist.as_records(train_digits))      # fits the label set on the training records
    logits = model(pixel_values=task.collate(train[:8])["pixel_values"]).logits

A record holds an image (`image`: a uint8 array (H, W) grayscale or (H, W, 3) RGB, or a path to an image file) and
a label. Grayscale images are repeated to three channels (RGB models); every image is resized to `image_size`
square, rescaled to [0, 1] and normalised with the processor's `image_mean` and `image_std`. The new classifier
head is trained in full and saved with the adapter (`head_modules`), as for text classification.

`data.train` may name the bundled MNIST 5k split (`mnist-5k:train`, `mnist-5k:test`, see `lorakit.vision.mnist`)
or an MNIST-layout CSV (784 pixels then the label per row, plain or .csv.gz); `read_records` reads both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.task import Batch, Features
from lorakit.train.tasks.classification import classifier_head, score_classifier
from lorakit.vision import mnist
from lorakit.vision.images import gray_batch_to_pixel_values, read_image


class ImageClassification:
    """Classify an image into one of `labels`; metric: accuracy (macro F1 is reported too).

    tokenizer: the model's image processor (its `image_mean`, `image_std` and `size` are read); named as the
        text tasks' first argument, which the trainer passes.
    image, label: the record fields holding the image and the label.
    labels: the label names in the order of the model's logits; default: the training records' distinct labels,
        sorted (numerically when all are integers).
    image_size: the side images are resized to; default: the processor's height (224 for EfficientNet-Lite0).
    """

    name = "image-classification"
    metric = "accuracy"
    greater_is_better = True

    def __init__(self, tokenizer: Any, *, image: str = "image", label: str = "label",
                 labels: Sequence[str | int] | None = None, image_size: int | None = None):
        size = image_size if image_size is not None else _processor_size(tokenizer)
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise LorakitError(f"image_size must be an int >= 8, got {size!r}")
        if labels is not None and (len(set(map(str, labels))) != len(labels) or len(labels) < 2):
            raise LorakitError(f"labels must be at least 2 distinct names, got {list(labels)}")
        mean, std = getattr(tokenizer, "image_mean", None), getattr(tokenizer, "image_std", None)
        if mean is None or std is None or len(mean) != 3 or len(std) != 3:
            raise LorakitError(f"{type(tokenizer).__name__} has no per-channel image_mean / image_std; pass the "
                               "model's image processor (load_model returns it)")
        self.processor = tokenizer
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.image, self.label, self.image_size = image, label, size
        self.labels: list[str] | None = [str(name) for name in labels] if labels is not None else None

    def state(self) -> dict[str, Any]:
        return {"task": self.name, "labels": self.labels, "image": self.image, "label": self.label,
                "image_size": self.image_size}

    def read_records(self, path: str) -> list[dict[str, Any]]:
        """The records of `path`: a bundled MNIST name or an MNIST-layout CSV (see the module docstring)."""
        if not mnist.is_dataset_name(path) and not str(path).endswith((".csv", ".csv.gz")):
            raise LorakitError(f"image-classification reads mnist-5k:train, mnist-5k:test, mnist-5k or an MNIST "
                               f"CSV (.csv, .csv.gz); got {path!r}")
        return mnist.as_records(mnist.load_dataset(path))

    def fit_labels(self, records: list[dict[str, Any]]) -> list[str]:
        """Set (once) and return the label set: the distinct labels of `records`, sorted."""
        if self.labels is None:
            found = {self._label(record, i) for i, record in enumerate(records)}
            if len(found) < 2:
                raise LorakitError(f"the training records have {len(found)} distinct label(s) in field "
                                   f"{self.label!r}; classification needs at least 2")
            numeric = all(name.lstrip("-").isdigit() for name in found)
            self.labels = sorted(found, key=int) if numeric else sorted(found)
        return self.labels

    def head_modules(self, model: nn.Module) -> list[str]:
        """The top-level `classifier` (checked against the label count)."""
        return classifier_head(model, self.labels, "image classification")

    def encode(self, records: list[dict[str, Any]]) -> list[Features]:
        """-> {"image": uint8 tensor (H, W) or (H, W, 3), "label": index into `labels`}."""
        if not records:
            return []
        index = {name: i for i, name in enumerate(self.fit_labels(records))}
        features: list[Features] = []
        for i, record in enumerate(records):
            label = self._label(record, i)
            if label not in index:
                raise LorakitError(f"record {i}: label {label!r} is not in the label set ({', '.join(index)}) "
                                   "learnt from the training data; fix the record or pass labels=")
            features.append({"image": self._pixels(record, i), "label": index[label]})
        return features

    def pixel_values(self, images: list[Any]) -> Tensor:
        """(N, 3, image_size, image_size) model input for images as records hold them (arrays or file paths)."""
        features = [{"image": self._pixels({self.image: image}, i), "label": 0} for i, image in enumerate(images)]
        return self.collate(features)["pixel_values"]

    def collate(self, features: list[Features]) -> Batch:
        """-> pixel_values (B, 3, image_size, image_size) float32, labels (B,)."""
        images = [f["image"] for f in features]
        if all(im.dim() == 2 and im.shape == images[0].shape for im in images):
            pixels = gray_batch_to_pixel_values(torch.stack(images), self.image_size, self.mean, self.std)
        else:
            pixels = torch.cat([self._one(im) for im in images])
        return {"pixel_values": pixels, "labels": torch.tensor([f["label"] for f in features], dtype=torch.long)}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Mean cross-entropy of the model's logits (B, num_labels), in float32."""
        return F.cross_entropy(self._logits(model, batch).float(), batch["labels"])

    def evaluate(self, model: nn.Module, features: list[Features], batch_size: int) -> dict[str, float]:
        """accuracy, macro F1 (`macro_f1`), mean cross-entropy (`loss`), and the number of distinct labels
        predicted (`predicted_classes`)."""
        return score_classifier(model, features, batch_size, self.collate, self._logits, self.labels, unit="image")

    def length(self, features: Features) -> int:
        return 1  # one image; the loop's tokens/s becomes images/s

    def _logits(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = model(pixel_values=batch["pixel_values"]).logits  # (B, num_labels)
        if self.labels is not None and logits.shape[-1] != len(self.labels):
            raise LorakitError(f"the model gives {logits.shape[-1]} logits but the task has {len(self.labels)} "
                               f"labels; load it with num_labels={len(self.labels)}")
        return logits

    def _one(self, image: Tensor) -> Tensor:
        """(1, 3, S, S) for one uint8 image (H, W) or (H, W, 3)."""
        if image.dim() == 2:
            return gray_batch_to_pixel_values(image[None], self.image_size, self.mean, self.std)
        x = image.permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                          antialias=True)
        return (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)

    def _pixels(self, record: dict[str, Any], i: int) -> Tensor:
        value = record.get(self.image)
        if value is None:
            raise LorakitError(f"record {i} has no {self.image!r} field (it has: {', '.join(map(str, record))})")
        if isinstance(value, (str, Path)):
            value = np.array(read_image(value))  # RGB (grayscale files converted), a writable copy
        array = np.asarray(value)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
            raise LorakitError(f"record {i}: image must be 8-bit grayscale (H, W) or RGB (H, W, 3), got "
                               f"{array.dtype} {array.shape}; convert it (RGBA: drop the alpha channel)")
        return torch.from_numpy(np.ascontiguousarray(array))

    def _label(self, record: dict[str, Any], i: int) -> str:
        value = record.get(self.label)
        label = "" if value is None else str(value).strip()
        if not label:
            raise LorakitError(f"record {i}: empty label in field {self.label!r}; fill it in or delete the record")
        return label


def _processor_size(processor: Any) -> int | None:
    """The square side a processor resizes or crops to (its crop size where it crops), else None."""
    for attr in ("crop_size", "size"):
        size = getattr(processor, attr, None)
        if size is None:
            continue
        height = size.get("height") if hasattr(size, "get") else getattr(size, "height", None)
        if isinstance(height, int):
            return height
    return None
