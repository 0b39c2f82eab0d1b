from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from ct2_models import ct2_bytes

from lorakit.errors import LorakitError
from lorakit.speech.ctranslate2_file import read_ct2_file


def _variables() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer/weight": rng.standard_normal((3, 4)).astype(np.float32),
        "layer/half": rng.standard_normal((2, 5, 3)).astype(np.float16),
        "num_heads": np.array(6, dtype=np.int16),
        "flag": np.array(1, dtype=np.int8),
        "ids": np.arange(7, dtype=np.int32),
    }


def test_read_returns_every_variable_with_its_dtype_and_shape(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(_variables(), {"tied/weight": "layer/weight"}, spec="WhisperSpec", revision=3))
    parsed = read_ct2_file(path)
    assert (parsed.spec, parsed.revision, parsed.binary_version) == ("WhisperSpec", 3, 6)
    for name, value in _variables().items():
        assert parsed.array(name).dtype == value.dtype and np.array_equal(parsed.array(name), value)
    assert parsed.dtypes["layer/half"] == "float16"
    assert parsed.scalar("num_heads") == 6


def test_alias_reads_the_variable_it_names(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(_variables(), {"tied/weight": "layer/weight"}))
    parsed = read_ct2_file(path)
    assert "tied/weight" in parsed
    assert np.array_equal(parsed.float32("tied/weight"), _variables()["layer/weight"])


def test_float32_widens_float16_exactly(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(_variables()))
    widened = read_ct2_file(path).float32("layer/half")
    assert widened.dtype == np.float32
    assert np.array_equal(widened, _variables()["layer/half"].astype(np.float32))


def test_float32_refuses_an_int8_weight(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(_variables()))
    with pytest.raises(LorakitError, match="'flag' is stored as int8"):
        read_ct2_file(path).float32("flag")


def test_missing_variable_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(_variables()))
    with pytest.raises(LorakitError, match="no variable 'encoder/conv1/weight'"):
        read_ct2_file(path).array("encoder/conv1/weight")


@pytest.mark.parametrize("cut", [0, 3, 10, 40, 100, -5, -1])
def test_truncated_file_raises_naming_the_offset(tmp_path: Path, cut: int) -> None:
    data = ct2_bytes(_variables(), {"tied/weight": "layer/weight"})
    path = tmp_path / "model.bin"
    path.write_bytes(data[:cut] if cut > 0 else data[:len(data) + cut] if cut < 0 else b"")
    with pytest.raises(LorakitError, match=r"truncated or corrupt|binary version"):
        read_ct2_file(path)


def test_trailing_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(_variables()) + b"\0")
    with pytest.raises(LorakitError, match="1 unexpected trailing bytes"):
        read_ct2_file(path)


def test_payload_size_disagreeing_with_shape_is_refused(tmp_path: Path) -> None:
    data = bytearray(ct2_bytes({"w": np.zeros((2, 2), dtype=np.float32)}))
    # The byte count follows name, rank, two dims and the dtype id: patch it from 16 to 12.
    offset = data.index(struct.pack("<I", 16))
    data[offset:offset + 4] = struct.pack("<I", 12)
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(LorakitError, match="declares 12 bytes, expected 16"):
        read_ct2_file(path)


def test_unknown_dtype_id_is_refused(tmp_path: Path) -> None:
    data = bytearray(ct2_bytes({"w": np.zeros(2, dtype=np.float32)}))
    offset = data.index(b"w\0") + 2 + 1 + 4  # name, rank, one dim: then the dtype id
    data[offset] = 9
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(LorakitError, match="unknown dtype id 9"):
        read_ct2_file(path)


def test_unsupported_binary_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(_variables(), version=2))
    with pytest.raises(LorakitError, match="binary version 2 is not supported"):
        read_ct2_file(path)


def test_alias_to_a_missing_variable_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(_variables(), {"tied/weight": "nowhere"}))
    with pytest.raises(LorakitError, match="names a missing variable 'nowhere'"):
        read_ct2_file(path)


def test_missing_file_is_a_lorakit_error(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="cannot read CTranslate2 model"):
        read_ct2_file(tmp_path / "absent.bin")
