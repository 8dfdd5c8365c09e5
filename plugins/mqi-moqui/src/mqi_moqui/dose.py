"""Reading the dose Moqui writes, with its geometry.

Moqui writes one file per beam and scorer, ``<BeamName>_<index>_<Scorer>.<ext>``, as
float64 (``save_to_bin<double>``): ``raw`` (values only, no geometry), ``mhd`` (a MetaImage
header beside a ``.raw``) or ``mha`` (header and values in one file). A MetaImage header
carries ``DimSize``, ``ElementSpacing``, ``Offset`` and ``ElementType``; its voxel count must
match the data. A dose is usable only when every value is finite, none is negative and some
are above zero: an all-zero dose is a failed simulation, not a cold spot.
"""

from __future__ import annotations

import array
import math
import sys
from pathlib import Path
from typing import Optional

import attrs

#: MetaImage element types and their ``array`` codes
ELEMENT_TYPES = {"MET_DOUBLE": "d", "MET_FLOAT": "f", "MET_INT": "i", "MET_UINT": "I", "MET_SHORT": "h",
                 "MET_USHORT": "H"}
#: what a headerless .raw holds (upstream's save_to_bin<double>)
RAW_TYPE = "MET_DOUBLE"
#: dose formats by preference: those that carry their geometry first
FORMATS = (".mhd", ".mha", ".raw", ".npz")
MAX_HEADER_BYTES = 64 * 1024
#: the arrays of upstream's sparse npz
NPZ_ARRAYS = ("indices", "indptr", "shape", "data", "format")


class DoseError(ValueError):
    """The dose file is missing, unreadable or not a usable dose (the message says why)."""


@attrs.frozen
class Grid:
    """A dose grid: voxels per axis (x, y, z), spacing and offset in mm."""

    dims: tuple[int, ...]
    spacing: tuple[float, ...] = ()
    offset: tuple[float, ...] = ()

    @property
    def voxels(self) -> int:
        return math.prod(self.dims)


@attrs.frozen
class Dose:
    """The values of one dose file (float64 in memory), and its grid when the file has one."""

    file: str
    values: array.array
    grid: Optional[Grid]
    element_type: str

    def summary(self) -> dict:
        total = math.fsum(self.values)
        out = {"file": self.file, "element_type": self.element_type, "voxels": len(self.values),
               "max": max(self.values), "mean": total / len(self.values), "sum": total,
               "nonzero": sum(1 for v in self.values if v > 0)}
        if self.grid is not None:
            out.update(dims=list(self.grid.dims), spacing_mm=list(self.grid.spacing), offset_mm=list(self.grid.offset))
        return out


def read_header(text: str, name: str) -> dict[str, str]:
    """``Key = Value`` lines of a MetaImage header, up to ``ElementDataFile`` (which ends it)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:  # upstream writes some lines without "=" ("Offset x y z", "TransformMatrix ...")
            parts = line.split(None, 1)
            if len(parts) < 2:
                continue
            key, value = parts
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    for key in ("DimSize", "ElementType", "ElementDataFile"):
        if key not in fields:
            raise DoseError(f"{name}: the MetaImage header has no {key}")
    return fields


def _numbers(value: str, kind: type, name: str, key: str) -> tuple:
    try:
        return tuple(kind(v) for v in value.split())
    except ValueError:
        raise DoseError(f"{name}: {key} {value!r} is not a list of numbers") from None


def _grid(fields: dict[str, str], name: str) -> Grid:
    dims = _numbers(fields["DimSize"], int, name, "DimSize")
    if not dims or any(d <= 0 for d in dims):
        raise DoseError(f"{name}: DimSize {fields['DimSize']!r} is not a grid")
    spacing = _numbers(fields.get("ElementSpacing", fields.get("ElementSize", "")), float, name, "ElementSpacing")
    offset = _numbers(fields.get("Offset", fields.get("Origin", fields.get("Position", ""))), float, name, "Offset")
    return Grid(dims, spacing, offset)


def _values(data: bytes, element_type: str, big_endian: bool, name: str) -> array.array:
    code = ELEMENT_TYPES.get(element_type)
    if code is None:
        raise DoseError(f"{name}: ElementType {element_type} is not a dose type ({', '.join(ELEMENT_TYPES)})")
    values = array.array(code)
    if not data or len(data) % values.itemsize:
        raise DoseError(f"{name}: {len(data)} bytes is not a whole number of {element_type} voxels "
                        f"({values.itemsize} bytes each)")
    values.frombytes(data)
    if big_endian != (sys.byteorder == "big"):
        values.byteswap()
    return values if code == "d" else array.array("d", values)


def read_npz(path: Path) -> array.array:
    """The dose of an ``.npz`` as upstream's ``save_to_npz`` writes it (``mqi_io.hpp``): a CSR
    matrix of spots x voxels (``indices``, ``indptr``, ``shape``, ``data`` float64, ``format``
    ``csr``), summed over the spots into one value per voxel."""
    import zipfile

    import numpy as np

    name = path.name
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in NPZ_ARRAYS if key not in npz.files]
            if missing:
                raise DoseError(f"{name}: not a sparse dose as Moqui writes it (no {missing[0]} array)")
            parts = {key: npz[key] for key in NPZ_ARRAYS}
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DoseError(f"{name}: not a readable npz ({exc})") from None
    # upstream (cnpy) writes the format as three 1-byte strings, scipy as one 3-byte string
    text = "".join(v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
                   for v in np.ravel(parts["format"]).tolist())
    if text.strip("\0 ").lower() != "csr":
        raise DoseError(f"{name}: format {text!r} is not csr")
    shape = [int(v) for v in np.ravel(parts["shape"])]
    indices, indptr, data = (np.ravel(parts[k]) for k in ("indices", "indptr", "data"))
    if len(shape) != 2 or min(shape) < 0 or len(indptr) != shape[0] + 1 or len(indices) != len(data) or \
            (len(indptr) and int(indptr[-1]) != len(data)):
        raise DoseError(f"{name}: the sparse matrix is inconsistent (shape {shape}, {len(indptr)} row pointers, "
                        f"{len(indices)} indices, {len(data)} values): the file is truncated or damaged")
    if len(indices) and (int(indices.max()) >= shape[1] or int(indices.min()) < 0):
        raise DoseError(f"{name}: a voxel index lies outside the {shape[1]} voxels of the grid")
    dense = np.bincount(indices.astype(np.int64), weights=data.astype(np.float64), minlength=shape[1])
    return array.array("d", dense.tobytes())


def read_dose(path: Path) -> Dose:
    """Read a raw, mhd, mha or npz dose file as Moqui writes it; raise :class:`DoseError`."""
    name = path.name
    suffix = path.suffix.lower()
    try:
        if suffix == ".raw":
            return Dose(name, _values(path.read_bytes(), RAW_TYPE, False, name), None, RAW_TYPE)
        if suffix == ".npz":
            return Dose(name, read_npz(path), None, "sparse MET_DOUBLE")
        if suffix not in (".mhd", ".mha"):
            raise DoseError(f"{name}: not a dose format Moqui writes here (raw, mhd, mha, npz)")
        with open(path, "rb") as fh:
            head = fh.read(MAX_HEADER_BYTES)
        marker = head.find(b"ElementDataFile")
        end = head.find(b"\n", marker) if marker >= 0 else -1
        if end < 0:
            raise DoseError(f"{name}: no MetaImage header (ElementDataFile) in its first {MAX_HEADER_BYTES} bytes")
        fields = read_header(head[:end + 1].decode("ascii", errors="replace"), name)
        grid = _grid(fields, name)
        big = fields.get("ElementByteOrderMSB", fields.get("BinaryDataByteOrderMSB", "False")).lower() == "true"
        where = fields["ElementDataFile"]
        if where == "LOCAL":
            data = path.read_bytes()[end + 1:]
        else:
            target = path.parent / where
            if target.parent != path.parent or target.is_symlink():
                raise DoseError(f"{name}: ElementDataFile {where!r} is not a file beside the header")
            data = target.read_bytes()
        values = _values(data, fields["ElementType"], big, name)
    except OSError as exc:
        raise DoseError(f"{name}: cannot be read ({exc.strerror or exc})") from None
    if len(values) != grid.voxels:
        raise DoseError(f"{name}: {len(values)} voxels, but the header's grid {'x'.join(map(str, grid.dims))} "
                        f"has {grid.voxels}: the file is truncated or not this grid's")
    return Dose(name, values, grid, fields["ElementType"])


def check_dose(dose: Dose) -> None:
    """A usable dose: every value finite, none negative, some above zero."""
    if not all(math.isfinite(v) for v in dose.values):
        raise DoseError(f"{dose.file}: the dose contains NaN or infinite values")
    if min(dose.values) < 0:
        raise DoseError(f"{dose.file}: the dose has negative values")
    if max(dose.values) <= 0:
        raise DoseError(f"{dose.file}: the dose is zero everywhere: the simulation deposited nothing")


def find_dose(output_dir: Path, scorer: str = "Dose") -> tuple[Optional[Path], list[str]]:
    """The dose file of scorer ``scorer`` in ``output_dir`` (``*_<scorer>.<ext>``, formats
    with geometry first), and the other files that were considered, for the message."""
    files = sorted(p for p in output_dir.iterdir() if p.is_file() and not p.is_symlink()) if output_dir.is_dir() else []
    for suffix in FORMATS:
        for path in files:
            if path.suffix.lower() == suffix and path.stem.lower().endswith("_" + scorer.lower()):
                return path, []
    return None, [p.name for p in files if p.suffix.lower() in FORMATS]
