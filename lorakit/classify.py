"""Classify image files with a vision base, or with a base and an image-classification adapter trained by lorakit.

    predictions = classify_images(["digit.png"], adapter="runs/mnist-efficientnet/adapter", top=3)
    predictions[0].top     # [("7", 0.98), ("1", 0.01), ("9", 0.004)]

With an adapter, the labels and the image size come from the `task.json` the trainer wrote beside it, and the
images go through the task's own pre-processing (as in training). Without one, the base's pretrained head scores its
own classes (EfficientNet-Lite0: the 1000 ImageNet classes, named by index) at the processor's size. Grayscale
images are converted to RGB (their one channel repeated), as in training; a file that is not an image is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.errors import LorakitError
from lorakit.vision.images import read_image

DEFAULT_MODEL = "efficientnet-lite0"


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), most probable first


def classify_images(paths: list[str | Path], *, model: str | None = None, adapter: str | Path | None = None,
                    top: int = 5) -> list[Prediction]:
    """The `top` most probable labels of each image file. model: a bundled vision base (default: the adapter's
    base, else efficientnet-lite0). Raises LorakitError for a missing or unreadable image, an adapter that is
    not an image-classification adapter, or a bad `top`; every image is read before the model loads."""
    from lorakit.io import load_adapter, read_adapter, read_task_state
    from lorakit.models import load_model
    from lorakit.train.tasks.image_classification import ImageClassification

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise LorakitError(f"top must be a positive int, got {top!r}")
    if not paths:
        raise LorakitError("no image given; name one or more image files")
    images = [np.array(read_image(p)) for p in paths]  # (H, W, 3) uint8 each; grayscale files repeated to RGB
    state: dict[str, Any] | None = None
    if adapter is not None:
        state = read_task_state(adapter)
        if state is None or state.get("task") != "image-classification" or not state.get("labels"):
            raise LorakitError(f"{adapter} has no image-classification task.json beside it; give the adapter "
                               "directory a lorakit image-classification run wrote (run.out_dir/adapter)")
        config, _, _ = read_adapter(adapter)
        model = model or config.get("base_model_name_or_path") or DEFAULT_MODEL
    name = model or DEFAULT_MODEL
    if state is not None:
        labels: list[str] = state["labels"]
        net, processor = load_model(name, head="image-classification", num_labels=len(labels))
        load_adapter(net, adapter)  # type: ignore[arg-type]
        task = ImageClassification(processor, labels=labels, image_size=state.get("image_size"))
    else:
        net, processor = load_model(name, head="image-classification")
        task = ImageClassification(processor, labels=None)
    pixels = task.pixel_values(images)  # (N, 3, S, S)
    with torch.no_grad():
        probabilities = net.eval()(pixel_values=pixels).logits.float().softmax(-1)  # (N, classes)
    names = task.labels or [str(i) for i in range(probabilities.shape[-1])]
    out = []
    for path, row in zip(paths, probabilities, strict=True):
        values, indices = row.topk(min(top, row.numel()))
        out.append(Prediction(str(path), [(names[i], float(v)) for v, i in zip(values, indices.tolist(),
                                                                                  strict=True)]))
    return out
