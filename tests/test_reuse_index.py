"""The reuse index: built at seal time, split by sha256 prefix, looked up in batches; survives a crash
between the last shard commit and the seal; built once for runs sealed without one."""

import hashlib
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from omnilmm_ray import cli, job, reuse, schema
from omnilmm_ray.reuse import ReuseIndex, build_index
from omnilmm_ray.samples import draw, encode, write_tar
from omnilmm_ray.storage import resolve, write_parquet_atomic
from omnilmm_ray.table import OutputTable


def _sha(s: int, i: int) -> str:
    return hashlib.sha256(f"{s}-{i}".encode()).hexdigest()


def _run_dir(tmp_path, shards=6, per_shard=200):
    """A run's shard files: every 7th row an error, prompt 'p' (shard 5: prompt 'q')."""
    fs, _ = resolve(str(tmp_path))
    for s in range(shards):
        rows = [
            {
                "source": f"src{s}",
                "key": str(i),
                "sample_index": i,
                "caption": None if i % 7 == 0 else f"cap {s} {i}",
                "error": "engine_error: x" if i % 7 == 0 else None,
                "sha256": _sha(s, i),
                "prompt": "q" if s == 5 else "p",
                "input_tokens": i,
            }
            for i in range(per_shard)
        ]
        write_parquet_atomic(fs, f"{tmp_path}/sh{s}.parquet", schema.table(rows, schema.OUTPUT_SCHEMA))
    return [f"sh{s}" for s in range(shards)]


def test_index_split_by_prefix_and_built_in_passes_answers_like_a_full_scan(tmp_path, monkeypatch):
    monkeypatch.setattr(reuse, "ROWS_PER_FILE", 100)  # 16 files per prefix digit...
    monkeypatch.setattr(reuse, "BUILD_ROWS", 300)  # ...built in several passes...
    monkeypatch.setattr(reuse, "ROW_GROUP", 8)  # ...with many row groups to skip
    ids = _run_dir(tmp_path)
    manifest = build_index(str(tmp_path), ids, 1200)
    assert manifest["prefix_chars"] == 1 and len(manifest["files"]) == 16
    assert manifest["rows"] == 6 * (200 - 29)  # errors are not indexed
    asked = [(s, i, p) for s in range(7) for i in range(0, 200, 3) for p in ("p", "q")]
    q = pa.table(
        {"sha256": [_sha(s, i) for s, i, _ in asked] + [None], "prompt": [p for *_, p in asked] + ["p"]}
    )
    hits = {(r["sha256"], r["prompt"]): r for r in ReuseIndex([(str(tmp_path), 1)]).lookup(q).to_pylist()}
    want = {
        (_sha(s, i), p): f"cap {s} {i}"
        for s, i, p in asked
        if s < 6 and i % 7 and p == ("q" if s == 5 else "p")
    }
    assert {k: r["caption"] for k, r in hits.items()} == want
    assert hits[(_sha(1, 3), "p")]["input_tokens"] == 3


def test_a_single_prompt_index_of_the_first_format_is_served_as_it_is(tmp_path):
    run = tmp_path / "run=r1"
    ids = _run_dir(run, shards=2, per_shard=20)
    manifest = build_index(str(run), ids, 40)
    assert manifest["version"] == reuse.VERSION and manifest["rows"] == 2 * (20 - 3)
    # the first format: no `name` column, no version in the manifest, `.parquet` files
    index, built = run / "_reuse" / "all.parquet", run / "_reuse" / f"all{reuse.INDEX_SUFFIX}"
    pq.write_table(pq.read_table(built).drop_columns(["name"]), index)
    built.unlink()
    first = {k: v for k, v in manifest.items() if k not in ("version", "suffix")}
    (run / "_reuse" / "_index.json").write_text(json.dumps(first))
    plan = {"fingerprint": {"prompt": "p"}, "shards": [{"shard_id": i} for i in ids]}
    found = reuse.open_index(str(tmp_path), ["r1"], lambda rid: plan)
    q = pa.table({"sha256": [_sha(0, 1), _sha(1, 2), _sha(0, 7)], "prompt": ["p", "p", "p"]})
    assert sorted(found.lookup(q).column("caption").to_pylist()) == ["cap 0 1", "cap 1 2"]
    assert "name" not in pq.read_schema(index).names  # not built again...
    marked = {**first, "version": reuse.VERSION}
    assert json.loads((run / "_reuse" / "_index.json").read_text()) == marked  # ...only marked current


def _job(tmp_path, inputs, out, calls, **cfg):
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump({"engine": {"backend": "fake", "fake_calls_log": str(calls)}, **cfg}))
    calls.write_text("")
    code = cli.main(["--config", str(f), "--input", str(inputs), "--output", str(out)])
    return code, sum(int(x) for x in calls.read_text().split())


@pytest.mark.integration
def test_reuse_serves_a_reupload_after_a_crash_between_commit_and_seal(ray_local, tmp_path, monkeypatch):
    inputs, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls.log"
    images = [encode(draw(i, size=(160, 120))[0]) for i in range(4)]
    write_tar(inputs / "a.tar", [(f"k{i}", {"jpg": im}) for i, im in enumerate(images)])

    def crash_at_seal(name):  # the process dies after every shard is committed, before the seal
        if name == "seal":
            raise RuntimeError("killed")

    monkeypatch.setattr(job, "kill_point", crash_at_seal)
    assert _job(tmp_path, inputs, out, calls) == (1, 4)
    monkeypatch.undo()
    table = OutputTable(str(out))
    assert table.sealed_runs() == [] and not list(out.glob("run=*/_reuse"))
    assert _job(tmp_path, inputs, out, calls) == (0, 0)  # resumed: all committed, now sealed
    (first,) = table.sealed_runs()
    assert (out / f"run={first}" / "_reuse" / "_index.json").exists()

    # night 2: image 1 re-uploaded under another name, and one new image
    write_tar(inputs / "b.tar", [("again", {"jpg": images[1]}), ("new", {"jpg": encode(draw(9)[0])})])
    assert _job(tmp_path, inputs, out, calls) == (0, 1)
    rows = {r["key"]: r for r in table.read_latest().to_pylist()}
    assert rows["again"]["cached"] and rows["again"]["caption"] == rows["k1"]["caption"]
    assert not rows["new"]["cached"]

    # an output whose runs were sealed before the index existed: built once, then served the same way
    for run in table.sealed_runs():
        shutil.rmtree(out / f"run={run}" / "_reuse")
    write_tar(inputs / "c.tar", [("third", {"jpg": images[2]}), ("fourth", {"jpg": images[3]})])
    assert _job(tmp_path, inputs, out, calls) == (0, 0)
    assert all((out / f"run={r}" / "_reuse" / "_index.json").exists() for r in table.sealed_runs())
    rows = {r["key"]: r for r in table.read_latest().to_pylist()}
    assert rows["third"]["cached"] and rows["fourth"]["cached"]


def _rows(out) -> dict[str, dict]:
    """Every run's rows by key (the keys differ across runs), with the per-prompt columns."""
    return {r["key"]: r for f in sorted(out.glob("run=*/*.parquet")) for r in pq.read_table(f).to_pylist()}


@pytest.mark.integration
def test_templated_job_reuses_a_reupload_only_with_the_same_rendered_prompt(ray_local, tmp_path):
    inputs, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls.log"
    images = [encode(draw(i, size=(160, 120))[0]) for i in range(2)]

    def sample(image, title=None):
        return {"jpg": image} | ({"json": json.dumps({"title": title}).encode()} if title else {})

    write_tar(inputs / "a.tar", [("k0", sample(images[0], "Mug")), ("k1", sample(images[1], "Cup"))])
    prompt = {"prompt": "Product: {metadata.title}. Describe it."}
    assert _job(tmp_path, inputs, out, calls, **prompt) == (0, 2)
    # night 2: both images again, one with its title, one with another; and one without a title
    write_tar(
        inputs / "b.tar",
        [
            ("same", sample(images[0], "Mug")),
            ("other", sample(images[1], "Bowl")),
            ("bare", sample(images[0])),
        ],
    )
    assert _job(tmp_path, inputs, out, calls, **prompt) == (0, 1)  # only "other" goes to the engine
    rows = _rows(out)
    assert rows["same"]["cached"] and rows["same"]["caption"] == rows["k0"]["caption"]
    assert rows["same"]["prompt"] == "Product: Mug. Describe it."
    assert not rows["other"]["cached"] and rows["other"]["prompt"] == "Product: Bowl. Describe it."
    assert rows["other"]["caption"] != rows["k1"]["caption"]  # the fake's text shows its prompt
    bare = rows["bare"]
    assert bare["error_kind"] == "missing_prompt_field" and bare["error"].count("{metadata.title}") == 1
    assert not bare["cached"] and bare["caption"] is None


@pytest.mark.integration
def test_two_prompt_job_reuses_both_captions_or_asks_only_for_the_missing_one(ray_local, tmp_path):
    inputs, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls.log"
    images = [encode(draw(i, size=(160, 120))[0]) for i in range(2)]
    write_tar(
        inputs / "a.tar",
        [("k0", {"jpg": images[0], "txt": b"a cat"}), ("k1", {"jpg": images[1], "txt": b"a dog"})],
    )
    prompts = {"prompts": {"alt": "Alt text.", "detailed": "The alt text was: {text}. Describe the image."}}
    assert _job(tmp_path, inputs, out, calls, **prompts) == (0, 4)  # 2 images x 2 prompts
    table = OutputTable(str(out))
    (first,) = table.sealed_runs()
    index = pq.read_table(out / f"run={first}" / "_reuse" / f"all{reuse.INDEX_SUFFIX}")
    assert len(index) == 4 and set(index.column("prompt").to_pylist()) == {
        "Alt text.",
        "The alt text was: a cat. Describe the image.",
        "The alt text was: a dog. Describe the image.",
    }
    # An index written before multi-prompt rows were indexed held nothing a lookup matches: built again.
    manifest = out / f"run={first}" / "_reuse" / "_index.json"
    manifest.write_text(json.dumps({"prefix_chars": 0, "rows": 0, "files": []}))

    # night 2: image 0 re-uploaded with its text (both prompts the same), image 1 with another text
    write_tar(
        inputs / "b.tar",
        [("again", {"jpg": images[0], "txt": b"a cat"}), ("half", {"jpg": images[1], "txt": b"a fox"})],
    )
    assert _job(tmp_path, inputs, out, calls, **prompts) == (0, 1)  # only half's detailed prompt
    assert json.loads(manifest.read_text())["rows"] == 4
    rows = _rows(out)
    again, half = rows["again"], rows["half"]
    assert again["cached"] and again["error"] is None
    assert {n: again[f"caption_{n}"] for n in ("alt", "detailed")} == {
        n: rows["k0"][f"caption_{n}"] for n in ("alt", "detailed")
    }
    assert again["input_tokens"] == rows["k0"]["input_tokens"]  # the sum over both prompts
    assert not half["cached"] and half["error"] is None  # one of its captions is new
    assert half["caption_alt"] == rows["k1"]["caption_alt"]
    assert half["prompt_detailed"] == "The alt text was: a fox. Describe the image."
    assert half["caption_detailed"] != rows["k1"]["caption_detailed"]
    assert half["input_tokens"] == half["input_tokens_alt"] + half["input_tokens_detailed"]
