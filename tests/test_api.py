"""The Python API: the README's example runs as written (fake engine), and the stage keeps the user's columns."""

import re
from pathlib import Path

import pytest

from omnilmm_ray.samples import build_samples, draw, encode

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(ray_local, tmp_path, monkeypatch, capsys):
    build_samples(tmp_path / "samples", shards=1, per_shard=4)
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), str(README), "exec"), {})
    out = capsys.readouterr().out
    assert (tmp_path / "captions").is_dir() and list((tmp_path / "captions").glob("run=*/_SUCCESS"))
    assert "'ok': 9" in out  # 4 tar images, 4 Parquet rows, 1 loose file in album0
    assert out.count(f"{tmp_path}/samples/files/album0/photo_000.jpg | [fake]") == 1
    assert out.count(f"{tmp_path}/samples/files/album1/photo_001.jpg | [fake]") == 1
    assert "[fake]" in out


def test_stage_keeps_user_columns_and_reports_bad_rows(ray_local, tmp_path):
    import ray

    from omnilmm_ray import build_caption_stage

    good = tmp_path / "a.jpg"
    good.write_bytes(encode(draw(3)[0]))
    stage = build_caption_stage({"engine": {"backend": "fake"}, "prompt": "Product {metadata.title}."})
    # one column type per dataset (Arrow): paths in one, bytes in the other
    paths = ray.data.from_items(
        [
            {"image": str(good), "title": "A mug", "n": 1},
            {"image": str(tmp_path / "gone.jpg"), "title": "Gone", "n": 3},
        ]
    )
    data = ray.data.from_items(
        [{"image": encode(draw(4)[0]), "title": "A lamp", "n": 2}, {"image": b"junk", "title": None, "n": 4}]
    )
    rows = sorted(stage(paths).take_all() + stage(data).take_all(), key=lambda r: r["n"])
    assert [r["title"] for r in rows] == ["A mug", "A lamp", "Gone", None]
    assert rows[0]["caption"].startswith("[fake]") and rows[0]["prompt"] == "Product A mug."
    assert rows[0]["image"] == str(good) and rows[0]["flags"] == []
    assert rows[1]["error"] is None and rows[1]["image"] == encode(draw(4)[0])
    assert rows[2]["error_kind"] == "missing_file" and "gone.jpg" in rows[2]["error"]
    assert rows[3]["error_kind"] == "not_an_image"
    assert "shard_id" not in rows[0] and "sample_index" not in rows[0] and "metadata" not in rows[0]


def test_caption_call_reports_config_errors(tmp_path):
    from omnilmm_ray import caption
    from omnilmm_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"scale\.batch_size"):
        caption(inputs=[str(tmp_path)], output=str(tmp_path / "o"), scale={"batch_size": 0})
