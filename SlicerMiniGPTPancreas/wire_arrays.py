"""CT arrays on the wire: how a slice and a volume travel between the Slicer client and the service, and their
size limits.

A slice travels inside a JSON message as `{"shape": [R, C], "dtype": "int16", "data": <base64>}`; a volume upload
is the raw bytes of the whole array (application/octet-stream), its shape and spacing in the query string. Both
are Hounsfield units in the model-view orientation (geometry.py), int16, little-endian, row-major. A volume may
instead travel as stored ([K, J, I], `encode_scan`) with its `ijk_to_ras` instead of a spacing, for the server to
make the model view itself; `resample=true` lets it resample a tilted one onto the nearest axial grid. Decoding checks
sizes before it allocates or decodes anything, so junk of any size costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .validation import ProtocolError, check_shape, check_spacing, excerpt, type_name

MAX_SLICE_SIDE = 4096  # pixels per slice side; CT slices are 512, large detector ones up to 1024-2048
MAX_VOLUME_SLICES = 4096
MAX_VOLUME_BYTES = 1 << 30  # 1 GiB of int16, e.g. 512 x 512 x 2048


def check_int16_array(array: Any, field: str, ndim: int) -> None:
    """An int16 numpy array of `ndim` dimensions within the slice / volume size limits."""
    if not isinstance(array, np.ndarray):
        raise ProtocolError(field, f"expected a numpy array, got {type_name(array)}")
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


# --- a slice, inside a JSON message -----------------------------------------------------------------------------

def encode_slice(slice_hu: np.ndarray, field: str = "slice") -> dict[str, Any]:
    """[R, C] int16 HU slice -> {"shape": [R, C], "dtype": "int16", "data": base64 of little-endian bytes}."""
    check_int16_array(slice_hu, field, ndim=2)
    data = base64.b64encode(np.ascontiguousarray(slice_hu, dtype="<i2").tobytes()).decode("ascii")
    return {"shape": [int(n) for n in slice_hu.shape], "dtype": "int16", "data": data}


def decode_slice(payload: Any, field: str = "slice") -> np.ndarray:
    """Inverse of encode_slice: a read-only [R, C] int16 array; refuses oversized, malformed or inconsistent input."""
    if not isinstance(payload, Mapping):
        raise ProtocolError(field, f"expected an object with shape, dtype and data, got {type_name(payload)}")
    for key in ("shape", "dtype", "data"):
        if key not in payload:
            raise ProtocolError(f"{field}.{key}", "required field is missing")
    rows, cols = check_shape(payload["shape"], f"{field}.shape", (MAX_SLICE_SIDE, MAX_SLICE_SIDE))
    if payload["dtype"] != "int16":
        raise ProtocolError(f"{field}.dtype", f"expected 'int16' (HU, little-endian), got "
                                              f"{excerpt(payload['dtype'])}")
    data = payload["data"]
    if not isinstance(data, str):
        raise ProtocolError(f"{field}.data", f"expected a base64 string, got {type_name(data)}")
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
    return int16_array(raw, (rows, cols))


def int16_array(buffer: bytes | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The native int16 array of `shape` over a little-endian byte buffer of exactly its size (no copy on a
    little-endian machine; read-only over bytes)."""
    return np.frombuffer(buffer, dtype="<i2").astype(np.int16, copy=False).reshape(shape)


SLICE_FIELD = {"encode": encode_slice, "decode": decode_slice}  # metadata of a message field holding a slice


# --- a volume upload --------------------------------------------------------------------------------------------

def encode_volume(volume_src: np.ndarray, spacing_mm: tuple[float, float, float]) -> tuple[bytes, dict[str, str]]:
    """Model-view volume [S, R, C] int16 + (col, row, slice) spacing -> (request body, query parameters)."""
    check_int16_array(volume_src, "volume", ndim=3)
    check_volume_bytes(volume_src.shape, "volume.shape")
    spacing = check_spacing(spacing_mm, "volume.spacing_mm", 3)
    params = {"shape": ",".join(str(n) for n in volume_src.shape), "dtype": "int16",
              "spacing_mm": ",".join(repr(s) for s in spacing)}
    return np.ascontiguousarray(volume_src, dtype="<i2").tobytes(), params


def encode_scan(volume_kji: np.ndarray, ijk_to_ras: np.ndarray,
                resample: bool = False) -> tuple[bytes, dict[str, str]]:
    """A volume as stored [K, J, I] int16 + its 4x4 ijk_to_ras (RAS mm) -> (request body, query parameters); with
    `resample` the server resamples it onto the nearest axial grid when it is tilted, instead of refusing it."""
    check_int16_array(volume_kji, "volume", ndim=3)
    check_volume_bytes(volume_kji.shape, "volume.shape")
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise ProtocolError("volume.ijk_to_ras", f"expected a finite 4x4 matrix, got shape {matrix.shape}")
    params = {"shape": ",".join(str(n) for n in volume_kji.shape), "dtype": "int16",
              "ijk_to_ras": ",".join(repr(float(v)) for v in matrix.ravel()),
              "resample": "true" if resample else "false"}
    return np.ascontiguousarray(volume_kji, dtype="<i2").tobytes(), params


def parse_scan_params(params: Mapping[str, str]) -> tuple[np.ndarray | None, bool]:
    """The geometry of a volume sent as stored (`encode_scan`): (its [4, 4] ijk_to_ras, resample), or (None,
    False) for a model-view volume."""
    resample = str(params.get("resample", "false"))
    if resample not in ("true", "false"):
        raise ProtocolError("resample", f"expected 'true' or 'false', got {excerpt(resample)}")
    if "ijk_to_ras" not in params:
        if resample == "true":
            raise ProtocolError("resample", "needs the volume as stored with its ijk_to_ras (encode_scan)")
        return None, False
    numbers = _parse_numbers(params, "ijk_to_ras", "16 comma-separated numbers (a 4x4 matrix, row by row)")
    if len(numbers) != 16:
        raise ProtocolError("ijk_to_ras", f"expected 16 comma-separated numbers (a 4x4 matrix, row by row), got "
                                          f"{excerpt(params['ijk_to_ras'])}")
    return np.array(numbers).reshape(4, 4), resample == "true"


def decode_volume(body: bytes, params: Mapping[str, str]) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Inverse of encode_volume / encode_scan: (read-only int16 array, (col, row, slice) spacing in mm, None for a
    volume sent as stored). The service reads the query first and streams the body into `int16_array`'s buffer."""
    shape, spacing, n_bytes = parse_volume_params(params)
    if len(body) != n_bytes:
        raise ProtocolError("body", f"has {len(body)} bytes but shape {list(shape)} int16 needs {n_bytes}")
    return int16_array(body, shape), spacing


def parse_volume_params(params: Mapping[str, str]) -> tuple[tuple[int, int, int], tuple[float, ...] | None, int]:
    """The query string of a volume upload -> (shape, spacing, body bytes), checked before the body is read. A
    volume sent as stored (`encode_scan`) has no spacing (None): its ijk_to_ras is `parse_scan_params`'."""
    if "ijk_to_ras" in params:
        shape, n_bytes = _parse_shape(params)
        return shape, None, n_bytes
    for key in ("shape", "dtype", "spacing_mm"):
        if key not in params:
            raise ProtocolError(key, "required query parameter is missing")
    shape, n_bytes = _parse_shape(params)
    spacing = _parse_numbers(params, "spacing_mm", "three comma-separated numbers in mm")
    return shape, check_spacing(spacing, "spacing_mm", 3), n_bytes


def _parse_numbers(params: Mapping[str, str], key: str, expected: str) -> list[float]:
    """The comma-separated decimal numbers of query parameter `key` (short plain tokens only, then float())."""
    parts = str(params[key]).split(",")
    if not all(re.fullmatch(r"[0-9.eE+-]{1,32}", part) for part in parts):
        raise ProtocolError(key, f"expected {expected}, got {excerpt(params[key])}")
    try:
        return [float(part) for part in parts]
    except ValueError as error:
        raise ProtocolError(key, f"expected comma-separated numbers ({error})") from error


def _parse_shape(params: Mapping[str, str]) -> tuple[tuple[int, int, int], int]:
    """(shape, body bytes) from the `shape` and `dtype` query parameters."""
    for key in ("shape", "dtype"):
        if key not in params:
            raise ProtocolError(key, "required query parameter is missing")
    if str(params["dtype"]) != "int16":
        raise ProtocolError("dtype", f"expected 'int16' (HU, little-endian), got {excerpt(params['dtype'])}")
    parts = str(params["shape"]).split(",")
    # Plain digits only: int() would also read "1_0" as 10 and " 7" as 7, and take any number of digits.
    if not all(re.fullmatch(r"\d{1,9}", part) for part in parts):
        raise ProtocolError("shape", f"expected comma-separated numbers S,R,C (whole, digits only), got "
                                     f"{excerpt(params['shape'])}")
    shape = check_shape([int(part) for part in parts], "shape", (MAX_VOLUME_SLICES, MAX_SLICE_SIDE, MAX_SLICE_SIDE))
    return shape, check_volume_bytes(shape, "shape")
