"""Input an attacker or a careless uploader makes: names that are not UTF-8, tar links, repeated keys, files
that pretend to be images, credentials hidden in URIs. Each becomes an error row or a clear config error;
no image is lost and nothing runs that the bytes chose."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from omnilmm_ray import cli
from omnilmm_ray.config import InputConfig, PreprocessConfig
from omnilmm_ray.preprocess import ImageError, decode
from omnilmm_ray.readers import read_shard
from omnilmm_ray.samples import draw, encode
from omnilmm_ray.sources import plan_shards
from omnilmm_ray.table import OutputTable
from tests.test_job_local import read_run

BAD = os.fsdecode(b"\xff\xfe_key")  # a name that is not UTF-8, as Python lists it: with lone surrogates
BAD_ESCAPED = "\\xff\\xfe_key"


def _jpg(i: int) -> bytes:
    return encode(draw(i)[0])


def _tar(path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return str(path)


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _rows(path: str) -> list[dict]:
    (shard,) = plan_shards([path], InputConfig())
    return pa.concat_tables(list(read_shard(shard, InputConfig()))).to_pylist()


def test_tar_link_members_are_error_rows_and_never_followed(tmp_path):
    rows = _rows(
        _tar(
            tmp_path / "links.tar",
            [
                ("good.jpg", _jpg(1)),
                _link("rel.jpg", "good.jpg"),
                _link("abs.jpg", "/etc/passwd"),
                _link("hard.jpg", "good.jpg", tarfile.LNKTYPE),
            ],
        )
    )
    *images, end = rows
    assert end["shard_rows"] == 4 and end["shard_skipped"] == 0
    by_key = {r["key"]: r for r in images}
    assert by_key["good"]["image"] == _jpg(1) and by_key["good"]["error"] is None
    for key, what in [("rel", "symbolic link to good.jpg"), ("abs", "symbolic link to /etc/passwd")]:
        assert by_key[key]["error_kind"] == "not_a_file" and what in by_key[key]["error"]
        assert by_key[key]["image"] is None
    assert by_key["hard"]["error_kind"] == "not_a_file" and "hard link" in by_key["hard"]["error"]


def test_a_repeated_member_starts_a_new_sample_with_the_same_key(tmp_path):
    rows = _rows(
        _tar(
            tmp_path / "dup.tar",
            [("c.jpg", _jpg(1)), ("c.txt", b"first"), ("c.jpg", _jpg(2)), ("c.txt", b"second")],
        )
    )
    *images, end = rows
    assert [(r["key"], r["sample_index"], r["text"]) for r in images] == [
        ("c", 0, "first"),
        ("c", 1, "second"),
    ]
    assert [r["image"] for r in images] == [_jpg(1), _jpg(2)] and end["shard_rows"] == 2


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "TGA", "PPM", "PCX"])
def test_only_promised_raster_formats_get_a_decoder_and_none_starts_a_process(fmt, monkeypatch):
    started = []

    def no_process(*a, **kw):
        started.append(a)
        raise AssertionError("a decoder tried to start a process")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, fmt)
    with pytest.raises(ImageError) as e:
        decode(buf.getvalue(), PreprocessConfig())
    assert e.value.kind == "not_an_image" and "JPEG" in str(e.value) and not started


def test_multi_picture_jpeg_from_phones_still_decodes():
    buf = io.BytesIO()
    frames = [Image.new("RGB", (40, 30), c) for c in [(200, 10, 10), (10, 200, 10)]]
    frames[0].save(buf, "MPO", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    im, w, h = decode(buf.getvalue(), PreprocessConfig())
    assert (w, h) == (40, 30) and im.getpixel((5, 5))[0] > 150


@pytest.mark.integration
def test_bad_names_links_and_repeated_keys_lose_no_image_and_stop_no_night(ray_local, tmp_path):
    """One job over tars, a Parquet file and a folder holding a name that is not UTF-8: it seals, every image
    has its own row, and the latest view keeps every one; a rewritten tar then replaces its old rows."""
    src = tmp_path / "in"
    _tar(src / "tars" / "a.tar", [("a0.jpg", _jpg(0)), ("a1.jpg", _jpg(1))])
    _tar(src / "tars" / "b.tar", [(f"{BAD}.jpg", _jpg(2)), (f"{BAD}.txt", b"t"), ("b1.jpg", _jpg(3))])
    _tar(
        src / "tars" / "c.tar",
        [
            ("c.jpg", _jpg(4)),
            ("c.jpg", _jpg(5)),
            ("d.jpg", _jpg(6)),
            ("c.jpg", _jpg(7)),
            _link("e.jpg", "/etc/passwd"),
        ],
    )
    (src / "pq").mkdir()
    pq.write_table(pa.table({"key": ["k", "k"], "image": [_jpg(8), _jpg(9)]}), src / "pq" / "dup.parquet")
    (src / "files").mkdir()
    (src / "files" / "ok.jpg").write_bytes(_jpg(10))
    bad_file = os.fsencode(src / "files") + b"/\xff.jpg"
    with open(bad_file, "wb") as f:
        f.write(_jpg(11))
    out = tmp_path / "out"
    args = ["--input", str(src / "tars"), "--input", str(src / "pq"), "--input", str(src / "files")]
    assert cli.main([*args, "--output", str(out), "--engine", "fake"]) == 0
    t, summary = read_run(out)
    rows = t.to_pylist()
    assert len(rows) == 2 + 2 + 5 + 2 + 2
    assert len({(r["source"], r["sample_index"]) for r in rows}) == len(rows)
    kinds = {(r["key"], r["error_kind"]) for r in rows if r["error_kind"]}
    assert kinds == {(BAD_ESCAPED, "invalid_name"), ("\\xff.jpg", "invalid_name"), ("e", "not_a_file")}
    assert sum(r["key"] == "c" and r["caption"] is not None for r in rows) == 3
    assert sum(r["key"] == "k" and r["caption"] is not None for r in rows) == 2
    latest = OutputTable(str(out)).read_latest()
    assert latest.num_rows == len(rows)

    _tar(src / "tars" / "c.tar", [("c.jpg", _jpg(4))])  # rewritten with one image: the other four are gone
    assert cli.main([*args, "--output", str(out), "--engine", "fake"]) == 0
    latest = OutputTable(str(out)).read_latest().to_pylist()
    assert [r["key"] for r in latest if r["source"].endswith("c.tar")] == ["c"]
    assert len(latest) == len(rows) - 4


SECRET = "wJalr/XUtnFEMI+K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS secret keys hold '/' and '+'


@pytest.mark.parametrize(
    "flags",
    [
        ["--input", f"s3://AKIDEXAMPLE:{SECRET}@bucket/in/", "--output", "/tmp/out"],
        ["--input", "/tmp/in", "--output", f"s3://AKIDEXAMPLE:{SECRET}@bucket/out"],
        ["--input", "/tmp/in", "--output", "/tmp/out", "--model", f"s3://AKIDEXAMPLE:{SECRET}@models/m/"],
    ],
)
@pytest.mark.parametrize("mode", ["--print-config", "--dry-run", None])
def test_a_secret_holding_a_slash_in_any_uri_is_refused_and_never_printed(flags, mode, capsys):
    assert cli.main([*flags, *([mode] if mode else []), "--engine", "fake"]) == 2
    out, err = capsys.readouterr()
    assert SECRET not in out + err and SECRET.split("/")[0] not in out + err
    assert "carries credentials" in err and err.rstrip().endswith("[exit 2]")


def test_a_secret_in_the_model_cache_folder_is_refused(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"engine: {{cache_dir: 'gs://user:{SECRET}@bucket/cache'}}\n")
    assert (
        cli.main(["--config", str(cfg), "--input", "/tmp/in", "--output", "/tmp/out", "--print-config"]) == 2
    )
    out, err = capsys.readouterr()
    assert "engine.cache_dir" in err and SECRET not in out + err
