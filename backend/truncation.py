"""Whether a NIfTI, NRRD or MetaImage file holds all the voxel bytes its header announces.

ITK's NIfTI reader fills the missing end of a truncated .nii or .nii.gz with zeros and says nothing, so a half-copied
file would be answered about as if half the patient were air; its NRRD and MetaImage readers refuse such files, but
with messages that do not say what is wrong. `check_complete` reads only the header and counts the data bytes
(streaming compressed data in chunks, never holding the volume), before ITK reads the file.

Formats and encodings it cannot size (NIfTI .hdr/.img pairs, NRRD ascii/bzip2 or multi-file data, MetaImage file
lists) are left to ITK, and so is NIfTI-2, which ITK (5.4) refuses whole.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

from SlicerMiniGPTPancreas.errors import UserError

_NIFTI_HEADER = 348  # NIfTI-1's header size, also its first field (sizeof_hdr), which tells the byte order
_CHUNK = 1 << 20  # bytes read, and at most inflated, at a time
_ZLIB_OR_GZIP = 32 + zlib.MAX_WBITS  # zlib's wbits for "detect a zlib or a gzip header"
_TEXT_HEADER_LIMIT = 1 << 20  # a NRRD or MetaImage header longer than this is not one: let ITK say so
_NRRD_TYPE_BYTES = {"char": 1, "short": 2, "int": 4, "long long": 8, "longlong": 8, "float": 4, "double": 8}
_META_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                    "MET_FLOAT": 4, "MET_DOUBLE": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8}


class TruncatedFileError(UserError, ValueError):
    """The volume file holds fewer bytes than its header announces."""


class DataLayout(NamedTuple):
    """Where a file's voxel data lies and how many bytes it must hold."""

    data_file: Path  # the header file itself when the data is attached
    offset: int  # where the data starts in `data_file` (compressed data: where the stream starts)
    needed: int  # bytes up to the end of the data: offset + voxel bytes, counted after inflating if compressed
    compressed: bool


def check_complete(path: Path) -> None:
    """Raise TruncatedFileError if the volume file at `path` ends before the data its header announces."""
    layout = _layout(path)
    if layout is None:
        return
    held = _held_bytes(layout)
    if held < layout.needed:
        where = path if layout.data_file == path else f"{layout.data_file} (the data file of {path})"
        holds = "inflates to" if layout.compressed else "holds"
        raise TruncatedFileError(
            f"{where} is truncated: it {holds} {held:,} of the {layout.needed:,} bytes its header announces; the "
            "file is damaged or was not fully copied. Copy or export it again.")


def _layout(path: Path) -> DataLayout | None:
    name = path.name.lower()
    if name.endswith(".nii"):
        with path.open("rb") as file:
            return _nifti_layout(path, file.read(_NIFTI_HEADER), compressed=False)
    if name.endswith(".nii.gz"):
        return _nifti_layout(path, _head(_inflated(path, 0), _NIFTI_HEADER), compressed=True)
    if name.endswith((".nrrd", ".nhdr")):
        return _nrrd_layout(path)
    if name.endswith((".mha", ".mhd")):
        return _meta_layout(path)
    return None


def _head(chunks: Iterator[bytes], size: int) -> bytes:
    """The first `size` bytes (fewer if there are none) of a stream of chunks."""
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= size:
            break
    return head[:size]


def _nifti_layout(path: Path, head: bytes, compressed: bool) -> DataLayout | None:
    """NIfTI-1 in either byte order; None for a header we cannot size. (NIfTI-2 is not sized: ITK does not read it.)"""
    for order in "<>":
        if len(head) < 4 or struct.unpack(order + "i", head[:4])[0] != _NIFTI_HEADER:
            continue
        if len(head) < _NIFTI_HEADER:
            return DataLayout(path, 0, _NIFTI_HEADER, compressed)  # the file ends inside its header
        dims = struct.unpack(order + "8h", head[40:56])
        bitpix = struct.unpack(order + "h", head[72:74])[0]
        vox_offset = struct.unpack(order + "f", head[108:112])[0]
        if head[344:347] != b"n+1" or not 1 <= dims[0] <= 7 or min(dims[1:dims[0] + 1]) < 1 or bitpix < 8 \
                or bitpix % 8 or not math.isfinite(vox_offset):
            return None  # a .hdr/.img pair, or nonsense ITK's message describes better than a byte count
        voxels = 1
        for size in dims[1:dims[0] + 1]:
            voxels *= size
        return DataLayout(path, 0, max(int(vox_offset), _NIFTI_HEADER) + voxels * bitpix // 8, compressed)
    return None


def _nrrd_layout(path: Path) -> DataLayout | None:
    fields, header_end = _text_header(path, lambda line: not line.strip())
    if fields is None or not fields.get("_first", "").startswith("NRRD"):
        return None
    encoding = fields.get("encoding", "").lower()
    item_bytes = _nrrd_item_bytes(fields.get("type", ""))
    if encoding not in ("raw", "gzip", "gz") or item_bytes is None or fields.get("lineskip", "0") != "0":
        return None
    data_file = fields.get("datafile", "")
    if data_file and (" " in data_file or "%" in data_file or data_file.upper().startswith("LIST")):
        return None  # data spread over several files
    byte_skip = _product(fields.get("byteskip", "0"), minimum=0)
    voxels = _product(fields.get("sizes", ""))
    if voxels is None or byte_skip is None:
        return None
    compressed = encoding != "raw"
    target, offset = (path.parent / data_file, 0) if data_file else (path, header_end)
    needed = byte_skip + voxels * item_bytes
    return DataLayout(target, offset, needed if compressed else offset + needed, compressed)


def _meta_layout(path: Path) -> DataLayout | None:
    fields, header_end = _text_header(path, lambda line: line.lstrip().startswith("ElementDataFile"))
    if fields is None or "elementdatafile" not in fields:
        return None
    item_bytes = _META_TYPE_BYTES.get(fields.get("elementtype", ""))
    voxels = _product(fields.get("dimsize", ""))
    channels = _product(fields.get("elementnumberofchannels", "1"))
    data_file = fields["elementdatafile"]
    header_size = _product(fields.get("headersize", "0"), minimum=0)  # -1: the data ends the file (unsized)
    if None in (item_bytes, voxels, channels, header_size) or data_file.upper().startswith("LIST") \
            or "%" in data_file or " " in data_file:
        return None
    compressed = fields.get("compresseddata", "false").lower() == "true"
    local = data_file.upper() == "LOCAL"
    target, offset = (path, header_end) if local else (path.parent / data_file, 0)
    offset += 0 if compressed else header_size
    data = voxels * channels * item_bytes
    return DataLayout(target, offset, data if compressed else offset + data, compressed)


def _text_header(path: Path, ends_header) -> tuple[dict | None, int]:
    """The "key: value" / "key = value" fields of a text header (keys lower-cased without spaces; "_first": the
    first line) and the offset just past the line for which `ends_header` is true, or past the last line."""
    fields: dict[str, str] = {}
    read = 0
    with path.open("rb") as file:
        while raw := file.readline(_TEXT_HEADER_LIMIT - read + 1):  # bounded: a binary file has no short lines
            read += len(raw)
            if read > _TEXT_HEADER_LIMIT:
                return None, 0
            line = raw.decode("latin-1").rstrip("\r\n")
            if not fields:
                fields["_first"] = line
            key, sep, value = line.partition(": " if ": " in line else "=")
            if sep and ":=" not in line and not line.startswith("#"):  # ":=" marks NRRD's free-form metadata
                fields[key.lower().replace(" ", "")] = value.strip()
            if ends_header(line):
                break
    return fields, read


def _nrrd_item_bytes(type_name: str) -> int | None:
    name = type_name.strip().lower()
    bits = re.search(r"int(8|16|32|64)", name)
    if bits:
        return int(bits.group(1)) // 8
    for word, size in _NRRD_TYPE_BYTES.items():  # "long long" before "int": "long long int" is 8 bytes
        if word in name:
            return size
    return None


def _product(text: str, minimum: int = 1) -> int | None:
    """The product of the whitespace-separated integers in `text`; None unless all are at least `minimum`."""
    try:
        sizes = [int(value) for value in text.split()]
    except ValueError:
        return None
    if not sizes or min(sizes) < minimum:
        return None
    product = 1
    for size in sizes:
        product *= size
    return product


def _held_bytes(layout: DataLayout) -> int:
    """Bytes `layout.data_file` holds (inflated from `offset` if compressed), counted up to `layout.needed`."""
    if not layout.data_file.is_file():
        return 0
    if not layout.compressed:
        return layout.data_file.stat().st_size
    held = 0
    for chunk in _inflated(layout.data_file, layout.offset):
        held += len(chunk)
        if held >= layout.needed:
            break
    return held


def _inflated(path: Path, offset: int) -> Iterator[bytes]:
    """The zlib or gzip stream at `offset` of `path`, inflated in chunks of at most _CHUNK bytes (concatenated gzip
    members, as pigz writes, included). Stops quietly where the file ends or the stream is damaged."""
    inflater = zlib.decompressobj(_ZLIB_OR_GZIP)
    with path.open("rb") as file:
        file.seek(offset)
        pending = file.read(_CHUNK)
        while pending:
            try:
                chunk = inflater.decompress(pending, _CHUNK)
            except zlib.error:
                return
            yield chunk
            if inflater.eof:  # the next gzip member, if any, starts in the unused bytes
                pending = inflater.unused_data or file.read(_CHUNK)
                inflater = zlib.decompressobj(_ZLIB_OR_GZIP)
            else:
                pending = inflater.unconsumed_tail or file.read(_CHUNK)
