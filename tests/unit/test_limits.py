"""What a case may cost (issue 15.5): measured by apparent size before anything is copied."""

from __future__ import annotations

import os

from mqi_framework.limits import human_bytes, measure_case


def test_a_sparse_file_counts_by_its_apparent_size(tmp_path):
    case = tmp_path / "case"
    (case / "beam 1").mkdir(parents=True)
    with open(case / "beam 1" / "001.ptn", "wb") as fh:
        fh.truncate(5 * 1024**3)  # 5 GiB that take no room on disk: a copy would write all of it
    assert os.stat(case / "beam 1" / "001.ptn").st_blocks < 100
    size = measure_case(case, max_bytes=2 * 1024**3)
    assert size.over and "more than 2.0 GiB" in size.over and "sparse" in size.over
    assert measure_case(case).bytes == 5 * 1024**3 and measure_case(case).over is None


def test_file_count_stops_at_the_limit_and_links_are_not_followed(tmp_path):
    case = tmp_path / "case"
    case.mkdir()
    for i in range(30):
        (case / f"{i}.ptn").write_bytes(b"x")
    big = tmp_path / "elsewhere.bin"
    big.write_bytes(b"y" * 10_000)
    (case / "link.bin").symlink_to(big)
    (case / "loop").symlink_to(case)
    size = measure_case(case, max_files=10)
    assert size.files == 11 and "more than 10 files" in size.over and "max_case_files" in size.over
    whole = measure_case(case, max_bytes=100)
    assert (whole.files, whole.bytes, whole.over) == (30, 30, None)


def test_human_bytes():
    assert [human_bytes(n) for n in (5, 2048, 3 * 1024**2, 5 * 1024**3, 2048 * 1024**3)] == [
        "5 B", "2.0 KiB", "3.0 MiB", "5.0 GiB", "2048.0 GiB"]
