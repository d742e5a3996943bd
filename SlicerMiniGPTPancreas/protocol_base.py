"""Building blocks of the protocol messages: ProtocolError, the size limits, API version parsing, field validators,
the int16 slice encoding and the `Schema` base class that gives every message `to_dict` / `from_dict`.

Import the public names from `protocol`, which re-exports them. The validators (`check_*`) and `Schema` serve
protocol.py and protocol_schemas.py; each validator raises ProtocolError naming the dotted path of the bad field.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

import numpy as np

MAX_SLICE_SIDE = 4096  # pixels per slice side; CT slices are 512, large detector ones up to 1024-2048
MAX_VOLUME_SLICES = 4096
MAX_VOLUME_BYTES = 1 << 30  # 1 GiB of int16, e.g. 512 x 512 x 2048
MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS_LIMIT = 1024
MAX_CHAT_MESSAGES = 64
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # volume and job ids: safe inside a URL path
EXCERPT_CHARS = 80  # client input quoted back in an error message is cut to this length


class ProtocolError(ValueError):
    """A message that breaks the protocol. `field` is the dotted path of the bad field, `problem` what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def parse_api_version(text: Any, field: str = "api_version") -> tuple[int, int]:
    """'1.0' -> (1, 0); anything else raises ProtocolError."""
    match = re.fullmatch(r"(\d{1,9})\.(\d{1,9})", text) if isinstance(text, str) else None
    if match is None:
        raise ProtocolError(field, f"expected a version 'MAJOR.MINOR' such as '1.0', got {excerpt(text)}")
    return int(match.group(1)), int(match.group(2))


# --- arrays on the wire ---------------------------------------------------------------------------------------------

def encode_slice(slice_hu: np.ndarray, field: str = "slice") -> dict[str, Any]:
    """[R, C] int16 HU slice -> {"shape": [R, C], "dtype": "int16", "data": base64 of little-endian bytes}."""
    check_int16_array(slice_hu, field, ndim=2)
    data = base64.b64encode(np.ascontiguousarray(slice_hu, dtype="<i2").tobytes()).decode("ascii")
    return {"shape": [int(n) for n in slice_hu.shape], "dtype": "int16", "data": data}


def decode_slice(payload: Any, field: str = "slice") -> np.ndarray:
    """Inverse of encode_slice: a read-only [R, C] int16 array; refuses oversized, malformed or inconsistent input."""
    if not isinstance(payload, Mapping):
        raise ProtocolError(field, f"expected an object with shape, dtype and data, got {_type_name(payload)}")
    for key in ("shape", "dtype", "data"):
        if key not in payload:
            raise ProtocolError(f"{field}.{key}", "required field is missing")
    rows, cols = check_shape(payload["shape"], f"{field}.shape", (MAX_SLICE_SIDE, MAX_SLICE_SIDE))
    if payload["dtype"] != "int16":
        raise ProtocolError(f"{field}.dtype", f"expected 'int16' (HU, little-endian), got "
                                              f"{excerpt(payload['dtype'])}")
    data = payload["data"]
    if not isinstance(data, str):
        raise ProtocolError(f"{field}.data", f"expected a base64 string, got {_type_name(data)}")
    n_bytes = rows * cols * 2
    expected_chars = 4 * math.ceil(n_bytes / 3)
    if len(data) != expected_chars:  # checked before decoding so that junk of any size costs nothing
        raise ProtocolError(f"{field}.data", f"has {len(data)} base64 characters but shape [{rows}, {cols}] int16 "
                                             f"needs {expected_chars} ({n_bytes} bytes)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ProtocolError(f"{field}.data", f"is not valid base64 ({error})") from error
    if len(raw) != n_bytes:  # right length, but padding ('=') hides missing bytes
        raise ProtocolError(f"{field}.data", f"decodes to {len(raw)} bytes but shape [{rows}, {cols}] int16 "
                                             f"needs {n_bytes}")
    return np.frombuffer(raw, dtype="<i2").astype(np.int16, copy=False).reshape(rows, cols)


# --- field checks (all raise ProtocolError naming the field) ---------------------------------------------------------

def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def excerpt(value: Any) -> str:
    """`repr(value)` cut to EXCERPT_CHARS, for quoting client input in an error message (any size, any depth)."""
    if isinstance(value, (list, tuple, dict)) and len(value) > EXCERPT_CHARS:
        return f"a {_type_name(value)} of {len(value)} items"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** EXCERPT_CHARS:
        return f"an integer of more than {EXCERPT_CHARS} digits"
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deep to print, or beyond Python's integer-to-text limit
        return f"a {_type_name(value)} too large to quote"
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS - 3] + "..."


def check_int16_array(array: Any, field: str, ndim: int) -> None:
    """An int16 numpy array of `ndim` dimensions within the slice / volume size limits."""
    if not isinstance(array, np.ndarray):
        raise ProtocolError(field, f"expected a numpy array, got {_type_name(array)}")
    if array.dtype.kind != "i" or array.dtype.itemsize != 2:
        raise ProtocolError(field, f"expected int16 HU values, got dtype {array.dtype}; convert with "
                                   "np.clip(a, -32768, 32767).round().astype(np.int16)")
    limits = (MAX_VOLUME_SLICES, MAX_SLICE_SIDE, MAX_SLICE_SIDE)[-ndim:]
    check_shape(list(array.shape), f"{field}.shape", limits)


def check_volume_bytes(shape: tuple[int, ...] | list[int], field: str) -> int:
    """The int16 byte count of `shape`, refused above MAX_VOLUME_BYTES."""
    n_bytes = math.prod(shape) * 2
    if n_bytes > MAX_VOLUME_BYTES:
        raise ProtocolError(field, f"{n_bytes} bytes of int16 exceed the upload limit of {MAX_VOLUME_BYTES} bytes; "
                                   "send a slice range (crop the volume) instead")
    return n_bytes


def check_shape(shape: Any, field: str, limits: tuple[int, ...]) -> tuple[int, ...]:
    """One size in [1, limit] per dimension, as a tuple of ints."""
    if not isinstance(shape, (list, tuple)) or len(shape) != len(limits):
        raise ProtocolError(field, f"expected {len(limits)} dimensions, got {excerpt(shape)}")
    for axis, (size, limit) in enumerate(zip(shape, limits)):
        check_int(size, f"{field}[{axis}]", 1, limit)
    return tuple(int(size) for size in shape)


def check_int(value: Any, field: str, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ProtocolError(field, f"expected an integer, got {_type_name(value)} {excerpt(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ProtocolError(field, f"{excerpt(value)} is outside the allowed range [{low}, {high}]")
    return int(value)


def check_float(value: Any, field: str, low: float | None = None, high: float | None = None,
                positive: bool = False) -> float:
    """A finite number in [low, high] (> 0 if `positive`), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError(field, f"expected a number, got {_type_name(value)} {excerpt(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the float range
        raise ProtocolError(field, f"{excerpt(value)} is too large for a number") from None
    if not math.isfinite(number) or (positive and number <= 0):
        raise ProtocolError(field, f"expected a finite{' positive' if positive else ''} number, got {number}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ProtocolError(field, f"{number} is outside the allowed range [{low}, {high}]")
    return number


def check_str(value: Any, field: str, max_len: int = 10_000, allow_empty: bool = False) -> str:
    """A string of at most `max_len` characters, not blank unless `allow_empty`."""
    if not isinstance(value, str):
        raise ProtocolError(field, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise ProtocolError(field, "must not be empty")
    if len(value) > max_len:
        raise ProtocolError(field, f"has {len(value)} characters, more than the limit of {max_len}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # JSON can carry "\\ud800", which is no character at all
        raise ProtocolError(field, f"is not valid text: a lone surrogate {value[error.start]!r} at position "
                                   f"{error.start}; send UTF-8 text") from None
    return value


def check_choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    """One of `choices`."""
    if value not in choices:
        raise ProtocolError(field, f"expected one of {', '.join(choices)}, got {excerpt(value)}")
    return value


def check_bool(value: Any, field: str) -> bool:
    """true or false (not 0 or 1)."""
    if not isinstance(value, bool):
        raise ProtocolError(field, f"expected true or false, got {_type_name(value)}")
    return value


def check_id(value: Any, field: str) -> str:
    """A volume or job id matching ID_PATTERN."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ProtocolError(field, f"expected 1-64 letters, digits, '-' or '_', got {excerpt(value)}")
    return value


def check_list(value: Any, field: str, max_len: int) -> tuple:
    """A list of at most `max_len` items, as a tuple."""
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(field, f"expected a list, got {_type_name(value)}")
    if len(value) > max_len:
        raise ProtocolError(field, f"has {len(value)} items, more than the limit of {max_len}")
    return tuple(value)


def check_spacing(value: Any, field: str, n: int) -> tuple[float, ...]:
    """`n` positive spacings in mm, as floats."""
    items = check_list(value, field, n)
    if len(items) != n:
        raise ProtocolError(field, f"expected {n} spacings in mm, got {len(items)}")
    return tuple(check_float(item, f"{field}[{axis}]", positive=True) for axis, item in enumerate(items))


def check_nested(value: Any, field: str, schema: type) -> Any:
    """An instance of the message class `schema`."""
    if not isinstance(value, schema):
        raise ProtocolError(field, f"expected a {schema.__name__}, got {_type_name(value)}")
    return value


# --- schema machinery ---------------------------------------------------------------------------------------------

SchemaT = TypeVar("SchemaT", bound="Schema")


def _wire(value: Any) -> Any:
    """A field value -> its JSON form."""
    if isinstance(value, Schema):
        return value.to_dict()
    if isinstance(value, np.ndarray):
        return encode_slice(value)
    if isinstance(value, (list, tuple)):
        return [_wire(item) for item in value]
    return value


def _unwire(value: Any, meta: Mapping[str, Any], path: str) -> Any:
    """A JSON value -> the field value, using the field's metadata ("slice", or "schema" (+ "many"))."""
    if meta.get("slice"):
        return decode_slice(value, path)
    schema = meta.get("schema")
    if schema is None:
        return value
    if not meta.get("many"):
        return _nested_from_dict(schema, value, path)
    items = check_list(value, path, meta.get("max_len", 100_000))
    return tuple(_nested_from_dict(schema, item, f"{path}[{index}]") for index, item in enumerate(items))


def _nested_from_dict(schema: type[Schema], value: Any, path: str) -> Any:
    try:
        return schema.from_dict(value)
    except ProtocolError as error:  # "BoxResult.confidence" -> "QueryResponse.boxes[2].confidence"
        _, dot, rest = error.field.partition(".")
        raise ProtocolError(path + dot + rest, error.problem) from None


@dataclass(frozen=True)
class Schema:
    """Base of every message: `from_dict` checks presence, `__post_init__` checks types and ranges."""

    def to_dict(self) -> dict[str, Any]:
        return {item.name: _wire(getattr(self, item.name)) for item in fields(self)}

    @classmethod
    def from_dict(cls: type[SchemaT], data: Any) -> SchemaT:
        if not isinstance(data, Mapping):
            raise ProtocolError(cls.__name__, f"expected a JSON object, got {_type_name(data)}")
        kwargs = {}
        for item in fields(cls):
            path = f"{cls.__name__}.{item.name}"
            if item.name in data:
                kwargs[item.name] = _unwire(data[item.name], item.metadata, path)
            elif item.default is MISSING and item.default_factory is MISSING:
                raise ProtocolError(path, "required field is missing")
        return cls(**kwargs)

    def _set(self, name: str, check: Any, *args: Any, **kwargs: Any) -> None:
        """Validate (and normalise, e.g. list -> tuple) field `name` with `check(value, path, ...)`."""
        value = check(getattr(self, name), f"{type(self).__name__}.{name}", *args, **kwargs)
        object.__setattr__(self, name, value)

    def _set_optional(self, name: str, check: Any, *args: Any, **kwargs: Any) -> None:
        if getattr(self, name) is not None:
            self._set(name, check, *args, **kwargs)

    def _set_items(self, name: str, schema: type, max_len: int) -> None:
        path = f"{type(self).__name__}.{name}"
        items = check_list(getattr(self, name), path, max_len)
        object.__setattr__(self, name, tuple(check_nested(item, f"{path}[{index}]", schema)
                                             for index, item in enumerate(items)))

