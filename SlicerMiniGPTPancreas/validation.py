"""Checking untrusted input field by field, and `Schema`, the base of every protocol message.

Each `check_*` takes the value, the dotted path of the field it came from ("SliceQueryRequest.options.temperature")
and its limits; it returns the value normalised (a list becomes a tuple, a numpy integer an int) or raises
`ProtocolError` naming that path and what is wrong. Client input quoted back in a message goes through `excerpt`,
so an error message stays short whatever was sent.

`Schema` gives a frozen dataclass `to_dict` / `from_dict`: `from_dict` checks that required fields are present,
`__post_init__` (written by each message with `_set` and the checks) their types and ranges, so a message that
exists is valid. protocol.py defines the messages; wire_arrays.py the array fields they carry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

import numpy as np

from .errors import UserError

EXCERPT_CHARS = 80  # client input quoted back in an error message is cut to this length


class ProtocolError(UserError, ValueError):
    """A message that breaks the protocol. `field` is the dotted path of the bad field, `problem` what is wrong."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def excerpt(value: Any) -> str:
    """`repr(value)` cut to EXCERPT_CHARS, for quoting client input in an error message (any size, any depth)."""
    if isinstance(value, (list, tuple, dict)) and len(value) > EXCERPT_CHARS:
        return f"a {type_name(value)} of {len(value)} items"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** EXCERPT_CHARS:
        return f"an integer of more than {EXCERPT_CHARS} digits"
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deep to print, or beyond Python's integer-to-text limit
        return f"a {type_name(value)} too large to quote"
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS - 3] + "..."


# --- field checks -------------------------------------------------------------------------------------------------

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
        raise ProtocolError(field, f"expected an integer, got {type_name(value)} {excerpt(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ProtocolError(field, f"{excerpt(value)} is outside the allowed range [{low}, {high}]")
    return int(value)


def check_float(value: Any, field: str, low: float | None = None, high: float | None = None,
                positive: bool = False) -> float:
    """A finite number in [low, high] (> 0 if `positive`), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError(field, f"expected a number, got {type_name(value)} {excerpt(value)}")
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
        raise ProtocolError(field, f"expected a string, got {type_name(value)}")
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
        raise ProtocolError(field, f"expected true or false, got {type_name(value)}")
    return value


def check_list(value: Any, field: str, max_len: int) -> tuple:
    """A list of at most `max_len` items, as a tuple."""
    if not isinstance(value, (list, tuple)):
        raise ProtocolError(field, f"expected a list, got {type_name(value)}")
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
        raise ProtocolError(field, f"expected a {schema.__name__}, got {type_name(value)}")
    return value


# --- the message base ---------------------------------------------------------------------------------------------

SchemaT = TypeVar("SchemaT", bound="Schema")


def _wire(value: Any, meta: Mapping[str, Any]) -> Any:
    """A field value -> its JSON form, using the field's metadata ("encode": a function for a value JSON cannot
    hold as it is, such as an array)."""
    if "encode" in meta:
        return meta["encode"](value)
    if isinstance(value, Schema):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_wire(item, {}) for item in value]
    return value


def _unwire(value: Any, meta: Mapping[str, Any], path: str) -> Any:
    """A JSON value -> the field value, using the field's metadata ("decode", or "schema" (+ "many"))."""
    if "decode" in meta:
        return meta["decode"](value, path)
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
        return {item.name: _wire(getattr(self, item.name), item.metadata) for item in fields(self)}

    @classmethod
    def from_dict(cls: type[SchemaT], data: Any) -> SchemaT:
        if not isinstance(data, Mapping):
            raise ProtocolError(cls.__name__, f"expected a JSON object, got {type_name(data)}")
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

