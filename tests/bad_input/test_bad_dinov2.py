"""Bad input for DINOv2-small through the CLI: each is exit code 2 and one error line naming the fix, refused before
the model loads, and nothing the user wrote changes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import expect_cli_error
from PIL import Image


def _digit(tmp: Path) -> Path:
    path = tmp / "digit.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(path)
    return path


def _train_config(tmp: Path, **model: object) -> Path:
    config = {"model": {"name": "dinov2-small", **model},
              "data": {"task": "image-classification", "train": "mnist-5k:train", "eval": "mnist-5k:test",
                       "image_size": 42, "train_limit": 4, "eval_limit": 4},
              "lora": {"rank": 2, "alpha": 4, "targets": ["all-linear"]},
              "optim": {"batch_size": 2, "max_steps": 1}, "run": {"out_dir": str(tmp / "run")}}
    path = tmp / "dinov2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    # DINOv2 is a self-supervised backbone: without an adapter there are no classes to name.
    "classify-without-adapter": (lambda tmp: ["classify", "--model", "dinov2-small", str(_digit(tmp))],
                                 r"dinov2-small has no pretrained classifier .*pass num_labels for a new head, or an "
                                 r"image-classification adapter"),
    "quantized-base": (lambda tmp: ["train", str(_train_config(tmp, quantize="nf4")), "--quiet"],
                       r"quantize applies to the text models; dinov2-small loads dense only"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_dinov2_input_is_one_line_and_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                 ) -> None:
    argv_for, matches = CASES[case]
    argv = argv_for(tmp_path)
    expect_cli_error(argv, capsys, matches=matches, watch=[tmp_path])
