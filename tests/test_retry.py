"""Failed rows are read again by later runs: error classification, retry planning over a small output
table written with the project's own commit code, the latest view, and the whole job."""

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from omnilmm_ray import schema
from omnilmm_ray.commit import ShardCommitter, shard_file, verify_run
from omnilmm_ray.config import ConfigError, JobConfig, load_config
from omnilmm_ray.job import summarize
from omnilmm_ray.samples import draw, encode, write_tar
from omnilmm_ray.sources import Retry
from omnilmm_ray.storage import write_bytes_atomic, write_json
from omnilmm_ray.table import OutputTable


def test_every_error_kind_is_classified_once():
    assert not schema.RETRYABLE_KINDS & schema.PERMANENT_KINDS
    assert schema.SHARD_KINDS <= schema.RETRYABLE_KINDS
    assert {"engine_error", "shard_unreadable", "shard_truncated"} <= schema.RETRYABLE_KINDS
    assert {"not_an_image", "decode_error", "too_many_pixels"} <= schema.PERMANENT_KINDS
    with pytest.raises(ValueError, match="declare it in schema.py"):
        schema.error("brand_new_kind", "x")


def test_retry_errors_setting():
    cfg = lambda v: load_config(None, {"input": ["x"], "output": "o", "retry_errors": v})  # noqa: E731
    assert cfg(None).sink.retry_kinds() == set(schema.RETRYABLE_KINDS)
    assert cfg("retryable").sink.retry_kinds() == set(schema.RETRYABLE_KINDS)
    assert cfg("engine_error,decode_error").sink.retry_kinds() == {"engine_error", "decode_error"}
    assert cfg("none").sink.retry_kinds() == set()
    with pytest.raises(ConfigError, match="sink.retry_errors.*unknown error kind.*flag --retry-errors"):
        cfg("engine_eror")


def _inputs(root: Path, n_tars=2, per=5) -> Path:
    for t in range(n_tars):
        write_tar(
            root / f"{t:05d}.tar", [(f"t{t}k{i}", {"jpg": encode(draw(10 * t + i)[0])}) for i in range(per)]
        )
    return root


def _run(table: OutputTable, cfg: JobConfig, kinds: dict[str, dict[int, str]] | None = None, stop=None):
    """Plan a run, commit a row for each wanted index (an error where `kinds[shard file name]` says so;
    `stop`: shard file name -> index of a shard-level error ending it), seal it; returns the run."""
    run = table.open_run(cfg)
    c = ShardCommitter(run.uri, run.shards)
    for s in run.shards:
        name, bad, rows = Path(s.uri).name, (kinds or {}).get(Path(s.uri).name, {}), []
        end = (stop or {}).get(name, 5)
        for i in [i for i in range(end) if s.wants(i)] + ([end] if end < 5 else []):
            row = {
                "source": s.uri,
                "shard_id": s.shard_id,
                "sample_index": i,
                "key": f"k{i}",
                "sha256": f"{name}{i}",
            }
            if i == end:
                row.update(key=None, **schema.error("shard_truncated", "cut"))
            elif i in bad:
                row.update(schema.error(bad[i], "failed"))
            else:
                row.update(caption=f"{run.run_id} caption {i}")
            rows.append(row)
        marker = {"shard_id": s.shard_id, "sample_index": -1, "shard_rows": end + 1 if end < 5 else 5}
        marker["error_kind"] = "shard_truncated" if end < 5 else None
        c.add(schema.table([*rows, marker], schema.ENGINE_SCHEMA))
    assert not c.uncommitted()
    rows = verify_run(run.uri, run.shards)
    write_json(table.fs, f"{table.path}/run={run.run_id}/_summary.json", summarize(cfg, run, rows, {}))
    write_bytes_atomic(table.fs, f"{table.path}/run={run.run_id}/_SUCCESS", b"")
    return run


def _planned(table, cfg):
    return {Path(s.uri).name: s.retry for s in table.open_run(cfg, write=False).shards}


def test_later_runs_retry_only_failed_rows_until_they_succeed(tmp_path):
    inputs = _inputs(tmp_path / "in")
    cfg = JobConfig(inputs=[str(inputs)], output=str(tmp_path / "out"), engine={"backend": "fake"})
    table = OutputTable(cfg.output)
    first = _run(table, cfg, {"00000.tar": {1: "engine_error", 3: "decode_error"}}, {"00001.tar": 2})
    assert _planned(table, cfg) == {
        "00000.tar": Retry(frozenset({1})),  # decode_error is permanent
        "00001.tar": Retry(frozenset(), 2),  # truncated at 2: everything from there
    }
    only_engine = cfg.model_copy(
        update={"sink": cfg.sink.model_copy(update={"retry_errors": ["engine_error"]})}
    )
    assert _planned(table, only_engine) == {"00000.tar": Retry(frozenset({1}))}
    on_demand = cfg.model_copy(
        update={"sink": cfg.sink.model_copy(update={"retry_errors": ["decode_error"]})}
    )
    assert _planned(table, on_demand) == {"00000.tar": Retry(frozenset({3}))}
    none = cfg.model_copy(update={"sink": cfg.sink.model_copy(update={"retry_errors": []})})
    assert _planned(table, none) == {}

    # the retry run: row 1 fails again, shard 1 now reads to its end
    second = _run(table, cfg, {"00000.tar": {1: "engine_error"}})
    assert {
        Path(s.uri).name: verify_run(second.uri, [s])
        and pq.read_table(shard_file(second.uri, s.shard_id)).column("sample_index").to_pylist()
        for s in second.shards
    } == {"00000.tar": [1], "00001.tar": [2, 3, 4]}
    assert _planned(table, cfg) == {"00000.tar": Retry(frozenset({1}))}
    _run(table, cfg)
    assert _planned(table, cfg) == {}  # nothing left: a nightly run with nothing new plans nothing

    latest = {(Path(r["source"]).name, r["key"]): r for r in table.read_latest().to_pylist()}
    assert len(latest) == 10  # the shard-level row of the first run is gone: shard 1 was read again
    assert latest[("00000.tar", "k1")]["caption"].startswith(table.sealed_runs()[2])
    assert latest[("00000.tar", "k3")]["error_kind"] == "decode_error"
    assert latest[("00001.tar", "k0")]["run"] == first.run_id
    assert latest[("00001.tar", "k4")]["run"] == second.run_id


def test_a_changed_file_is_read_whole_and_its_old_failures_forgotten(tmp_path):
    inputs = _inputs(tmp_path / "in")
    cfg = JobConfig(inputs=[str(inputs)], output=str(tmp_path / "out"), engine={"backend": "fake"})
    table = OutputTable(cfg.output)
    _run(table, cfg, {"00000.tar": {1: "engine_error"}}, {"00001.tar": 2})
    _inputs(tmp_path / "in", n_tars=1, per=6)  # 00000.tar rewritten: a new fingerprint
    assert _planned(table, cfg) == {"00000.tar": None, "00001.tar": Retry(frozenset(), 2)}
    _run(table, cfg)
    assert _planned(table, cfg) == {}


def test_committer_and_verify_expect_exactly_the_retried_rows(tmp_path):
    inputs = _inputs(tmp_path / "in", n_tars=1)
    cfg = JobConfig(inputs=[str(inputs)], output=str(tmp_path / "out"), engine={"backend": "fake"})
    table = OutputTable(cfg.output)
    _run(table, cfg, {"00000.tar": {1: "engine_error", 3: "engine_crash"}})
    run = table.open_run(cfg)
    (shard,) = run.shards
    assert shard.retry == Retry(frozenset({1, 3}))
    c = ShardCommitter(run.uri, run.shards)
    row = {"source": shard.uri, "shard_id": shard.shard_id, "key": "k", "caption": "c"}
    c.add(
        schema.table(
            [{**row, "sample_index": 1}, {"shard_id": shard.shard_id, "sample_index": -1, "shard_rows": 4}],
            schema.ENGINE_SCHEMA,
        )
    )
    assert c.uncommitted() == [shard.shard_id]  # waits for index 3
    c.add(schema.table([{**row, "sample_index": 3}], schema.ENGINE_SCHEMA))
    assert not c.uncommitted()
    assert verify_run(run.uri, run.shards).rows == 2
    assert pq.read_table(shard_file(run.uri, shard.shard_id)).column("sample_index").to_pylist() == [1, 3]
    f = shard_file(run.uri, shard.shard_id)
    t = pq.read_table(f)
    extra = t.slice(0, 1).set_column(2, "sample_index", pa.array([0], pa.int64())).cast(t.schema)
    pq.write_table(pa.concat_tables([t, extra]), f)  # one row the retry did not want
    with pytest.raises(RuntimeError, match="retried rows"):
        verify_run(run.uri, run.shards)


def _job(args: list[str], tmp_path: Path, **cfg) -> int:
    from omnilmm_ray import cli

    f = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return cli.main(["--config", str(f), *args])


def _calls(log: Path) -> int:
    n = sum(int(x) for x in log.read_text().split()) if log.exists() else 0
    log.write_text("")
    return n


def _latest(out: Path) -> dict:
    return {(Path(r["source"]).name, r["key"]): r for r in OutputTable(str(out)).read_latest().to_pylist()}


def _images(n: int, seed: int) -> list:
    return [(f"k{i}", {"jpg": encode(draw(seed + i)[0])}) for i in range(n)]


@pytest.mark.integration
def test_a_cut_shard_fails_the_run_and_the_rerun_reads_only_the_rest(ray_local, tmp_path, capsys):
    import tarfile

    inputs, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls.log"
    write_tar(inputs / "good.tar", _images(4, 100))
    full = write_tar(tmp_path / "full.tar", _images(10, 200))
    with tarfile.open(full) as t:
        cut_at = t.getmembers()[6].offset
    (inputs / "cut.tar").write_bytes(full.read_bytes()[:cut_at])  # an upload still in progress
    args = ["--input", str(inputs), "--output", str(out)]
    engine = {"backend": "fake", "fake_calls_log": str(calls)}

    assert _job(args, tmp_path, engine=engine) == 3
    assert "1 shard(s) could not be read to their end (sink.max_failed_shards=0)" in capsys.readouterr().err
    assert _calls(calls) == 4 + 6 and OutputTable(str(out)).sealed_runs() == []

    (inputs / "cut.tar").write_bytes(full.read_bytes())  # the upload completed
    assert _job(args, tmp_path, engine=engine) == 0
    assert _calls(calls) == 4  # only samples 6..9 of the cut shard
    latest = _latest(out)
    assert len(latest) == 14 and all(r["caption"] for r in latest.values())

    # The sealed run covered the cut version of the file: the next run reads the complete one, all cached.
    assert _job(args, tmp_path, engine=engine) == 0
    assert _calls(calls) == 0 and len(_latest(out)) == 14


@pytest.mark.integration
def test_an_unchanged_shard_that_failed_is_read_again_once_the_config_is_fixed(ray_local, tmp_path):
    inputs, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls.log"
    write_tar(inputs / "good.tar", _images(4, 300))
    imgs = [encode(draw(400 + i)[0]) for i in range(3)]
    pq.write_table(pa.table({"key": ["p0", "p1", "p2"], "picture": imgs}), inputs / "data.parquet")
    args = ["--input", str(inputs), "--output", str(out)]
    engine = {"backend": "fake", "fake_calls_log": str(calls)}

    wrong = {"parquet_image_columns": ["jpg"]}
    assert _job(args, tmp_path, engine=engine, input=wrong, sink={"max_failed_shards": 1}) == 0
    assert _calls(calls) == 4
    assert _latest(out)[("data.parquet", None)]["error_kind"] == "shard_unreadable"

    fixed = {"parquet_image_columns": ["picture"]}
    assert _job(args, tmp_path, engine=engine, input=fixed) == 0
    # the Parquet shard, not good.tar; two of its images are the same bytes, asked of the engine once
    assert _calls(calls) == len({hashlib.sha256(b).digest() for b in imgs}) == 2
    latest = _latest(out)
    assert len(latest) == 7 and all(r["caption"] for r in latest.values())
    runs = OutputTable(str(out)).sealed_runs()
    assert latest[("data.parquet", "p0")]["run"] == runs[1] and latest[("good.tar", "k0")]["run"] == runs[0]


def _fail_rows(out: Path, indices: set[int], kind: str) -> None:
    """Turn rows of the newest sealed run into errors, as an engine outage would have left them."""
    run = out / f"run={OutputTable(str(out)).sealed_runs()[-1]}"
    f = next(run.glob("*.parquet"))
    t = pq.read_table(f)
    rows = t.to_pylist()
    for r in rows:
        if r["sample_index"] in indices:
            r.update(caption=None, **schema.error(kind, "overloaded"))
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), f)
    shutil.rmtree(run / "_reuse")  # its reuse index is built again from the rows as they now are
    summary = json.loads((run / "_summary.json").read_text())
    summary["errors_by_kind"][kind] = {"count": len(indices), "examples": []}
    (run / "_summary.json").write_text(json.dumps(summary))


@pytest.mark.integration
def test_engine_errors_are_captioned_again_nightly_and_on_demand(ray_local, tmp_path):
    inputs, out, calls = tmp_path / "in", tmp_path / "out", tmp_path / "calls.log"
    write_tar(inputs / "a.tar", _images(5, 500))
    args = ["--input", str(inputs), "--output", str(out)]
    engine = {"backend": "fake", "fake_calls_log": str(calls)}
    assert _job(args, tmp_path, engine=engine) == 0 and _calls(calls) == 5
    _fail_rows(out, {2}, "engine_error")

    assert _job(args, tmp_path, engine=engine, sink={"retry_errors": []}) == 0
    assert _calls(calls) == 0 and _latest(out)[("a.tar", "k2")]["error_kind"] == "engine_error"
    assert (
        _job([*args, "--retry-errors", "engine_error"], tmp_path, engine=engine, sink={"retry_errors": []})
        == 0
    )
    assert _calls(calls) == 1 and _latest(out)[("a.tar", "k2")]["caption"]

    _fail_rows(out, {2}, "engine_error")  # the row the retry wrote fails too, in that run's file
    assert _job(args, tmp_path, engine=engine) == 0  # a plain nightly run, nothing new
    assert _calls(calls) == 1
    latest = _latest(out)
    assert len(latest) == 5 and all(r["caption"] for r in latest.values())
    assert _job(args, tmp_path, engine=engine) == 0 and _calls(calls) == 0
