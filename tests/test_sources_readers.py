"""Planning shards and reading them into sample rows (no Ray)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnilmm_ray.config import ConfigError, InputConfig
from omnilmm_ray.readers import read_shard
from omnilmm_ray.samples import build_samples, draw, encode, write_tar
from omnilmm_ray.sources import plan_shards, without_done

CFG = InputConfig()


def rows_of(shard, cfg=CFG):
    t = pa.concat_tables(list(read_shard(shard, cfg)))
    rows = t.to_pylist()
    return rows[:-1], rows[-1]


def test_plan_mixes_formats_and_ignores_other_files(tmp_path):
    build_samples(tmp_path, shards=2, per_shard=4)
    (tmp_path / "files" / "README.md").write_text("not an image")
    (tmp_path / "files" / "album0" / "UPPER.JPG").write_bytes(encode(draw(9)[0]))
    shards = plan_shards([str(tmp_path)], CFG)
    assert sorted(s.format for s in shards) == ["files", "parquet", "tar", "tar"]
    files = next(s for s in shards if s.format == "files")
    assert "files/album0/UPPER.JPG" in files.members and not any(m.endswith(".md") for m in files.members)
    assert plan_shards([str(tmp_path / "webdataset" / "*.tar")], CFG)[0].format == "tar"
    # the same input twice is planned once
    assert len(plan_shards([str(tmp_path), str(tmp_path / "webdataset")], CFG)) == 4


def test_loose_files_grouped_into_shards(tmp_path):
    build_samples(tmp_path, shards=0, per_shard=10)
    shards = plan_shards([str(tmp_path / "files")], InputConfig(files_per_shard=2))
    assert [len(s.members) for s in shards] == [2, 2, 1]


@pytest.mark.parametrize("pattern", ["nope/*.tar", "missing-dir"])
def test_input_matching_nothing_is_a_config_error(tmp_path, pattern):
    with pytest.raises(ConfigError, match="matches no file"):
        plan_shards([str(tmp_path / pattern)], CFG)


def test_input_with_only_unknown_files_is_a_config_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="none is a .tar, .parquet or image"):
        plan_shards([str(tmp_path)], CFG)


def test_tar_samples_sidecars_and_sample_without_image(tmp_path):
    img = encode(draw(1)[0])
    p = write_tar(
        tmp_path / "a.tar",
        [
            ("k1", {"jpg": img, "json": b'{"url": "u1"}', "txt": b"one"}),
            ("k2", {"json": b'{"url": "u2"}'}),  # no image: skipped and counted, not a row
            ("sub/k3", {"PNG": encode(draw(2)[0], "PNG")}),
        ],
    )
    rows, end = rows_of(plan_shards([str(p)], CFG)[0])
    assert [(r["key"], r["sample_index"]) for r in rows] == [("k1", 0), ("sub/k3", 1)]
    assert json.loads(rows[0]["metadata"]) == {"url": "u1"} and rows[0]["text"] == "one"
    assert rows[0]["image"] == img
    assert end["shard_rows"] == 2 and end["shard_skipped"] == 1 and end["key"] is None


def test_truncated_tar_keeps_complete_samples_and_adds_an_error_row(tmp_path):
    p = write_tar(tmp_path / "t.tar", [(f"k{i}", {"jpg": encode(draw(i)[0])}) for i in range(4)])
    data = p.read_bytes()
    p.write_bytes(data[:7000])  # inside the third image (the tail of the file is zero padding)
    rows, end = rows_of(plan_shards([str(p)], CFG)[0])
    assert rows[-1]["error_kind"] == "shard_truncated" and "the tar ends at byte 7000" in rows[-1]["error"]
    assert all(r["error"] is None for r in rows[:-1]) and len(rows) >= 2
    assert end["shard_rows"] == len(rows)


def test_unreadable_shard_can_fail_the_run(tmp_path):
    p = tmp_path / "junk.tar"
    p.write_bytes(b"\x00garbage" * 100)
    shard = plan_shards([str(p)], CFG)[0]
    rows, end = rows_of(shard)
    assert [r["error_kind"] for r in rows] == ["shard_unreadable"] and end["shard_rows"] == 1
    with pytest.raises(RuntimeError, match="junk.tar"):
        rows_of(shard, InputConfig(on_unreadable_shard="fail"))


def test_parquet_keys_metadata_null_bytes_and_hf_struct(tmp_path):
    img = encode(draw(3)[0])
    pq.write_table(
        pa.table({"key": ["a", "b"], "jpg": [img, None], "url": ["u", "v"]}), tmp_path / "x.parquet"
    )
    rows, end = rows_of(plan_shards([str(tmp_path / "x.parquet")], CFG)[0])
    assert [r["key"] for r in rows] == ["a", "b"] and json.loads(rows[0]["metadata"]) == {"url": "u"}
    assert rows[1]["error_kind"] == "missing_image" and end["shard_rows"] == 2
    hf = pa.table({"image": [{"bytes": img, "path": "p.jpg"}]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    rows, _ = rows_of(plan_shards([str(tmp_path / "hf.parquet")], CFG)[0])
    assert rows[0]["image"] == img and rows[0]["key"] == "000000000"


def test_parquet_without_image_column_names_the_setting(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "y.parquet")
    rows, _ = rows_of(plan_shards([str(tmp_path / "y.parquet")], CFG)[0])
    assert rows[0]["error_kind"] == "shard_unreadable" and "input.parquet_image_columns" in rows[0]["error"]
    rows, _ = rows_of(
        plan_shards([str(tmp_path / "y.parquet")], CFG)[0], InputConfig(parquet_image_columns=["pixels"])
    )
    assert rows[0]["image"] == b"x"


def test_loose_files_keys_are_relative_paths_with_sidecars(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "001.jpg").write_bytes(encode(draw(1)[0]))
    (tmp_path / "d" / "001.txt").write_text("caption one")
    rows, end = rows_of(plan_shards([str(tmp_path)], CFG)[0])
    assert rows[0]["key"] == "d/001.jpg" and rows[0]["text"] == "caption one"
    assert rows[0]["source"] == f"{tmp_path}/d/001.jpg"


def test_without_done_skips_unchanged_files(tmp_path):
    build_samples(tmp_path, shards=2, per_shard=2)
    shards = plan_shards([str(tmp_path)], CFG)
    done = {u: fp for s in shards for u, fp in s.fingerprints.items()}
    assert without_done(shards, done) == []
    (tmp_path / "webdataset" / "00001.tar").write_bytes(
        (tmp_path / "webdataset" / "00000.tar").read_bytes() + b"\0" * 512
    )
    new = plan_shards([str(tmp_path)], CFG)
    assert [s.uri for s in without_done(new, done)] == [str(tmp_path / "webdataset" / "00001.tar")]
    one_file = next(u for s in shards if s.format == "files" for u in s.fingerprints)
    del done[one_file]
    left = without_done(new, done)
    assert any(s.format == "files" and list(s.fingerprints) == [one_file] for s in left)
