"""Bad vision input through the CLI (`lorakit classify`, `lorakit train` on an image-classification config): each is
exit code 2 and one error line naming the file (and the row) and the fix; nothing the user wrote changes. A
grayscale image is not an error: it is converted to RGB (its channel repeated), as in training."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import expect_cli_error
from PIL import Image

PIXELS = 28 * 28


def _csv(rows: list[str]) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / "digits.csv.gz"
        with gzip.open(path, "wt") as f:
            f.write("\n".join(rows) + "\n")
        return path
    return write


def _row(label: int, values: int = PIXELS, pixel: str = "0") -> str:
    return ",".join([pixel] * values + [str(label)])


def _train_argv(tmp: Path, train: Path | str) -> list[str]:
    config = {"model": {"name": "efficientnet-lite0"},
              "data": {"task": "image-classification", "train": str(train), "eval_fraction": 0.5, "image_size": 32},
              "lora": {"rank": 2, "alpha": 4, "targets": ["_project_conv"]},
              "optim": {"batch_size": 2, "max_steps": 1}, "run": {"out_dir": str(tmp / "run")}}
    path = tmp / "vision.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["train", str(path), "--quiet"]


TRAIN_CASES = {
    "csv-corrupted-row": (_csv([_row(0), _row(1), _row(2).replace("0,", "x,", 1)]),
                          r"digits.csv.gz row 3: 'x' is not an integer; fix or delete the row"),
    "csv-pixel-out-of-range": (_csv([_row(0), _row(1, pixel="256")]), r"row 2: pixel 1 is 256, outside 0\.\.255"),
    "csv-rgb-rows-for-a-grayscale-layout": (_csv([_row(0), _row(1, values=3 * PIXELS)]),
                                            r"row 2: 2353 values, expected 785 \(784 pixels and a label\)"),
    "data-that-is-not-an-mnist-csv": (lambda tmp: _write(tmp / "photos.jsonl", "{}\n"),
                                      r"image-classification reads mnist-5k:train, mnist-5k:test, mnist-5k or an "
                                      r"MNIST CSV"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_bad_image_data_is_one_line_and_exit_2(tmp_path, capsys, case):
    setup, message = TRAIN_CASES[case]
    data = setup(tmp_path)
    expect_cli_error(_train_argv(tmp_path, data), capsys, matches=message, watch=[data])
    assert not (tmp_path / "run" / "adapter").exists()


def _not_an_image(tmp: Path) -> list[str]:
    return ["classify", str(_write(tmp / "notes.png", "not a picture"))]


def _adapter_without_task(tmp: Path) -> list[str]:
    image = tmp / "digit.png"
    Image.new("L", (28, 28)).save(image)
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return ["classify", str(image), "--adapter", str(tmp / "adapter")]


CLASSIFY_CASES = {
    "not-an-image": (_not_an_image, r"notes.png is not an image Pillow can read .*; give a PNG, JPEG"),
    "missing-image": (lambda tmp: ["classify", str(tmp / "nowhere.png")], r"image file '.*nowhere.png' not found"),
    "adapter-without-an-image-task": (_adapter_without_task, r"has no image-classification task.json beside it"),
    "top-zero": (lambda tmp: ["classify", str(_write(tmp / "x.png", "")), "--top", "0"],
                 r"top must be a positive int, got 0"),
}


@pytest.mark.parametrize("case", CLASSIFY_CASES)
def test_bad_classify_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    argv, message = CLASSIFY_CASES[case]
    expect_cli_error(argv(tmp_path), capsys, matches=message, watch=[tmp_path])


def test_a_grayscale_image_is_converted_to_rgb_not_refused(tmp_path, capsys):
    from lorakit.cli import main

    gray, rgb = tmp_path / "gray.png", tmp_path / "rgb.png"
    Image.new("L", (40, 40), color=90).save(gray)
    Image.new("RGB", (40, 40), color=(90, 90, 90)).save(rgb)
    assert main(["classify", str(gray), str(rgb), "--top", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["top"] == lines[1]["top"]  # the same picture in one channel or three
