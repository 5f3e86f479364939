"""Inputs cut short never read as complete: tars cut at or inside a member header, Parquet files cut or
with a footer that lies. Pure reads (no Ray), plus one run of the whole job."""

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from omnilmm_ray.config import InputConfig
from omnilmm_ray.readers import read_shard
from omnilmm_ray.samples import draw, encode, write_tar
from omnilmm_ray.sources import plan_shards

CFG = InputConfig(read_attempts=1)


def rows_of(path: Path, cfg=CFG):
    rows = pa.concat_tables(list(read_shard(plan_shards([str(path)], cfg)[0], cfg))).to_pylist()
    return rows[:-1], rows[-1]


@pytest.fixture
def ten_jpegs(tmp_path) -> tuple[Path, bytes, list[tarfile.TarInfo]]:
    p = write_tar(tmp_path / "full.tar", [(f"k{i}", {"jpg": encode(draw(i)[0])}) for i in range(10)])
    with tarfile.open(p) as t:
        members = t.getmembers()
    return p, p.read_bytes(), members


def _cut(tmp_path, data: bytes, at: int) -> Path:
    p = tmp_path / f"cut-{at}.tar"
    p.write_bytes(data[:at])
    return p


@pytest.mark.parametrize("extra", [0, 100, 511])
def test_tar_cut_at_or_inside_a_member_header(tmp_path, ten_jpegs, extra):
    _, data, members = ten_jpegs
    at = members[6].offset + extra
    rows, end = rows_of(_cut(tmp_path, data, at))
    assert [r["key"] for r in rows[:6]] == [f"k{i}" for i in range(6)]
    assert all(r["error"] is None and r["image"] for r in rows[:6])
    assert len(rows) == 7 and rows[6]["error_kind"] == "shard_truncated" and rows[6]["sample_index"] == 6
    assert f"the tar ends at byte {at}" in rows[6]["error"]
    assert end["shard_rows"] == 7 and end["error_kind"] == "shard_truncated"


def test_tar_cut_inside_member_data_is_truncated_too(tmp_path, ten_jpegs):
    _, data, members = ten_jpegs
    at = members[6].offset_data + 50
    rows, _ = rows_of(_cut(tmp_path, data, at))
    assert [r["error_kind"] for r in rows] == [None] * 6 + ["shard_truncated"]
    assert f"byte {at}, inside member k6.jpg (50 of {members[6].size} bytes)" in rows[6]["error"]


def test_tar_cut_inside_the_padding_after_the_last_member(tmp_path, ten_jpegs):
    _, data, members = ten_jpegs
    last = members[-1]
    assert last.size % 512, "the last member needs padding for this case"
    rows, _ = rows_of(_cut(tmp_path, data, last.offset_data + last.size + 1))
    assert [r["error_kind"] for r in rows] == [None] * 10 + ["shard_truncated"]


@pytest.mark.parametrize("blocks", [0, 1])
def test_tar_cut_at_or_inside_its_end_of_archive_marker(tmp_path, ten_jpegs, blocks):
    _, data, members = ten_jpegs
    last = members[-1]
    eoa = last.offset_data + -(-last.size // 512) * 512
    assert data[eoa : eoa + 1024] == b"\0" * 1024
    rows, end = rows_of(_cut(tmp_path, data, eoa + 512 * blocks))
    assert [r["error_kind"] for r in rows] == [None] * 10 + ["shard_truncated"]
    assert f"byte {eoa + 512 * blocks}" in rows[10]["error"] and end["shard_rows"] == 11


@pytest.mark.parametrize("padding", [0, 512, 10240 * 3])
def test_complete_tar_with_any_zero_padding_reads_whole(tmp_path, ten_jpegs, padding):
    _, data, members = ten_jpegs
    last = members[-1]
    eoa = last.offset_data + -(-last.size // 512) * 512
    p = tmp_path / "padded.tar"
    p.write_bytes(data[: eoa + 1024] + b"\0" * padding)  # exactly the marker, or padded further
    rows, end = rows_of(p)
    assert len(rows) == 10 and all(r["error"] is None for r in rows)
    assert end["shard_rows"] == 10 and end["error_kind"] is None


def test_tar_with_a_corrupt_member_header_is_unreadable_not_shorter(tmp_path, ten_jpegs):
    _, data, members = ten_jpegs
    at = members[6].offset
    p = tmp_path / "corrupt.tar"
    p.write_bytes(data[:at] + b"\xff" * 512 + data[at + 512 :])
    rows, _ = rows_of(p)
    assert [r["error_kind"] for r in rows] == [None] * 6 + ["shard_unreadable"]
    assert f"invalid member header at byte {at}" in rows[6]["error"]


def test_truncated_tar_can_fail_the_run(tmp_path, ten_jpegs):
    _, data, members = ten_jpegs
    with pytest.raises(RuntimeError, match="truncated: the tar ends at byte"):
        rows_of(_cut(tmp_path, data, members[6].offset), InputConfig(on_unreadable_shard="fail"))


def _parquet(rows_per_group=3) -> tuple[bytes, pq.FileMetaData]:
    buf = io.BytesIO()
    imgs = [encode(draw(i)[0]) for i in range(10)]
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(10)], "jpg": imgs}), buf, row_group_size=3)
    data = buf.getvalue()
    return data, pq.ParquetFile(io.BytesIO(data)).metadata


def _group_start(md, g: int) -> int:
    rg = md.row_group(g)
    return min(rg.column(j).dictionary_page_offset or rg.column(j).data_page_offset for j in range(2))


def test_parquet_cut_short_is_an_error_row(tmp_path):
    data, _ = _parquet()
    p = tmp_path / "cut.parquet"
    p.write_bytes(data[: len(data) // 2])
    rows, end = rows_of(p)
    assert [r["error_kind"] for r in rows] == ["shard_unreadable"] and end["shard_rows"] == 1


def test_parquet_whose_footer_lies_keeps_the_rows_before_the_bad_row_group(tmp_path):
    """The data of the third row group is cut out; the footer still points at it."""
    data, md = _parquet()
    footer_len = int.from_bytes(data[-8:-4], "little")
    p = tmp_path / "lying.parquet"
    p.write_bytes(data[: _group_start(md, 2)] + data[-8 - footer_len :])
    rows, end = rows_of(p)
    assert [r["key"] for r in rows[:6]] == [f"k{i}" for i in range(6)]
    assert all(r["error"] is None for r in rows[:6])
    assert len(rows) == 7 and rows[6]["error_kind"] == "shard_unreadable" and end["shard_rows"] == 7


@pytest.mark.integration
def test_job_reports_a_truncated_tar_shard(ray_local, tmp_path, ten_jpegs):
    from omnilmm_ray import cli

    _, data, members = ten_jpegs
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "cut.tar").write_bytes(data[: members[6].offset])
    out = tmp_path / "out"
    args = ["--input", str(inputs), "--output", str(out), "--engine", "fake"]
    assert cli.main([*args, "--max-failed-shards", "1"]) == 0
    run = next(out.glob("run=*"))
    t = pads.dataset(str(run), format="parquet").to_table()
    kinds = sorted((r["sample_index"], r["error_kind"] or "ok") for r in t.to_pylist())
    assert kinds == [(i, "ok") for i in range(6)] + [(6, "shard_truncated")]
    summary = json.loads((run / "_summary.json").read_text())
    assert summary["errors_by_kind"]["shard_truncated"]["count"] == 1 and summary["failed_shards"] == 1
