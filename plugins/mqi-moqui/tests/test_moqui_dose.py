"""Reading the dose as Moqui writes it (issue 14.6): float64, MetaImage geometry, checks."""

from __future__ import annotations

import array
import math
import subprocess
import sys

import pytest

from mqi_moqui.dose import DoseError, check_dose, find_dose, read_dose


def write_mhd(folder, stem, values, dims, element_type="MET_DOUBLE", code="d", msb=False, local=False):
    data = array.array(code, values)
    if msb != (sys.byteorder == "big"):
        data.byteswap()
    header = (f"ObjectType = Image\nNDims = 3\nBinaryDataByteOrderMSB = {msb}\nOffset = -10 -10 0\n"
              f"ElementSpacing = 2 2 3\nDimSize = {' '.join(map(str, dims))}\nElementType = {element_type}\n"
              f"ElementDataFile = {'LOCAL' if local else stem + '.raw'}\n")
    if local:
        (folder / f"{stem}.mha").write_bytes(header.encode() + data.tobytes())
        return folder / f"{stem}.mha"
    (folder / f"{stem}.raw").write_bytes(data.tobytes())
    (folder / f"{stem}.mhd").write_text(header)
    return folder / f"{stem}.mhd"


def test_mhd_mha_and_raw_are_read_with_their_geometry(tmp_path):
    values = [0.0, 1.5, 2.5, 0.0, 3.0, 0.25]
    dose = read_dose(write_mhd(tmp_path, "F1_0_Dose", values, (3, 2, 1)))
    assert list(dose.values) == values and dose.grid.dims == (3, 2, 1)
    assert dose.grid.spacing == (2.0, 2.0, 3.0) and dose.grid.offset == (-10.0, -10.0, 0.0)
    summary = dose.summary()
    assert summary["sum"] == pytest.approx(7.25) and summary["max"] == 3.0 and summary["nonzero"] == 4
    big = read_dose(write_mhd(tmp_path, "F2_0_Dose", values, (3, 2, 1), "MET_FLOAT", "f", msb=True))
    assert list(big.values) == values
    assert list(read_dose(write_mhd(tmp_path, "F3_0_Dose", values, (6, 1, 1), local=True)).values) == values
    assert list(read_dose(tmp_path / "F1_0_Dose.raw").values) == values  # float64 without a header


def test_float64_is_not_read_as_float32(tmp_path):
    # the old reader took Moqui's float64 for float32: garbage or "NaN" for every real beam
    path = tmp_path / "B_0_Dose.raw"
    path.write_bytes(array.array("d", [1.0, 2.0, 3.0]).tobytes())
    assert list(read_dose(path).values) == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("values,dims,reason", [
    ([1.0] * 5, (3, 2, 1), "5 voxels, but the header's grid 3x2x1 has 6"),
    ([0.0] * 6, (3, 2, 1), "zero everywhere"),
    ([1.0, math.nan, 0, 0, 0, 0], (3, 2, 1), "NaN or infinite"),
    ([1.0, -0.5, 0, 0, 0, 0], (3, 2, 1), "negative"),
])
def test_unusable_doses_are_errors(tmp_path, values, dims, reason):
    with pytest.raises(DoseError, match=reason):
        check_dose(read_dose(write_mhd(tmp_path, "F_0_Dose", values, dims)))


def test_a_truncated_raw_is_an_error(tmp_path):
    path = tmp_path / "B_0_Dose.raw"
    path.write_bytes(b"\0" * 12)
    with pytest.raises(DoseError, match="not a whole number of MET_DOUBLE voxels"):
        read_dose(path)


def test_the_dose_scorer_is_picked_by_name_geometry_first(tmp_path):
    write_mhd(tmp_path, "F1_0_LETd", [1.0], (1, 1, 1))
    (tmp_path / "F1_0_Dose.raw").write_bytes(array.array("d", [1.0]).tobytes())
    write_mhd(tmp_path, "F1_0_Dose", [1.0], (1, 1, 1))
    assert find_dose(tmp_path)[0].name == "F1_0_Dose.mhd"
    assert find_dose(tmp_path, "LETd")[0].name == "F1_0_LETd.mhd"
    missing, seen = find_dose(tmp_path, "Dij")
    assert missing is None and "F1_0_Dose.mhd" in seen


def test_postprocess_command_writes_a_summary_or_says_why_not(tmp_path):
    out = tmp_path / "beam" / "output"
    out.mkdir(parents=True)
    run = [sys.executable, "-m", "mqi_moqui.postprocess", str(tmp_path / "beam")]
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 1 and "no Dose dose" in proc.stdout
    write_mhd(out, "F1_0_Dose", [0.0] * 8, (2, 2, 2))
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 1 and "zero everywhere" in proc.stdout
    write_mhd(out, "F1_0_Dose", [0.0] * 7 + [2.0], (2, 2, 2))
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 0 and "2x2x2 grid" in proc.stdout
    assert '"dims": [\n    2,' in (out / "summary.json").read_text()


def write_npz(path, rows, voxels, fmt=None):
    """A sparse spots x voxels matrix as upstream's save_to_npz writes it (cnpy: uint32
    indices, indptr and shape, float64 data, the format as three 1-byte strings)."""
    import numpy as np

    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.uint32)
    indices = np.array([i for r in rows for i, _ in r], dtype=np.uint32)
    data = np.array([v for r in rows for _, v in r], dtype="<f8")
    np.savez(path, indices=indices, indptr=indptr, shape=np.array([len(rows), voxels], dtype=np.uint32), data=data,
             format=fmt if fmt is not None else np.frombuffer(b"csr", dtype="S1"))


def test_an_upstream_npz_is_summed_over_its_spots(tmp_path):
    import numpy as np

    write_npz(tmp_path / "F1_0_Dose.npz", [[(0, 1.0), (3, 2.0)], [], [(3, 0.5), (7, 4.0)]], 8)
    dose = read_dose(tmp_path / "F1_0_Dose.npz")
    assert list(dose.values) == [1.0, 0, 0, 2.5, 0, 0, 0, 4.0] and dose.grid is None
    check_dose(dose)
    np.savez(tmp_path / "scipy_Dose.npz", indices=np.array([1], dtype=np.int32), indptr=np.array([0, 1]),
             shape=np.array([1, 2]), data=np.array([3.0]), format=np.array(b"csr"))  # scipy.sparse.save_npz's way
    assert list(read_dose(tmp_path / "scipy_Dose.npz").values) == [0.0, 3.0]
    assert find_dose(tmp_path, "Dose")[0].suffix == ".npz"


@pytest.mark.parametrize("damage, reason", [
    (lambda p: write_npz(p, [[(9, 1.0)]], 8), "outside the 8 voxels"),
    (lambda p: write_npz(p, [[(0, 1.0)]], 8, fmt=__import__("numpy").frombuffer(b"csc", dtype="S1")), "not csr"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not really"), "not a readable npz"),
    (lambda p: __import__("numpy").savez(p, data=[1.0]), "no indices array"),
])
def test_a_damaged_npz_is_an_error(tmp_path, damage, reason):
    path = tmp_path / "F1_0_Dose.npz"
    damage(path)
    with pytest.raises(DoseError, match=reason):
        read_dose(path)


def test_the_summary_says_how_the_dose_was_computed(tmp_path):
    out = tmp_path / "beam" / "output"
    out.mkdir(parents=True)
    write_mhd(out, "F1_0_Dose", [0.0] * 7 + [2.0], (2, 2, 2))
    (tmp_path / "beam" / "run.json").write_text('{"random_seed": 7, "rbe": 1.1, "number_of_fractions": 1}')
    run = [sys.executable, "-m", "mqi_moqui.postprocess", str(tmp_path / "beam")]
    assert subprocess.run(run, capture_output=True, text=True).returncode == 0
    import json

    assert json.loads((out / "summary.json").read_text())["run"] == {"random_seed": 7, "rbe": 1.1,
                                                                     "number_of_fractions": 1}
    (tmp_path / "beam" / "run.json").write_text("{broken")
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 1 and "run.json is not readable" in proc.stdout
