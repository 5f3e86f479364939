"""The commit protocol and the engine stage, driven directly (no Ray)."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from omnilmm_ray import schema
from omnilmm_ray.commit import ShardCommitter, load_progress, shard_file, verify_run
from omnilmm_ray.config import JobConfig
from omnilmm_ray.preprocess import preprocess_batch
from omnilmm_ray.reuse import HITS_SCHEMA, apply_reuse
from omnilmm_ray.samples import draw, encode
from omnilmm_ray.sources import Shard
from omnilmm_ray.stages import CaptionStage, budget_hint


def engine_rows(shard_id, n, skipped=0):
    rows = [
        {
            "source": f"src-{shard_id}",
            "shard_id": shard_id,
            "key": f"k{i}",
            "sample_index": i,
            "caption": f"c{i}",
        }
        for i in range(n)
    ]
    return rows, {
        "source": f"src-{shard_id}",
        "shard_id": shard_id,
        "sample_index": -1,
        "shard_rows": n,
        "shard_skipped": skipped,
    }


# 1: every write done in `add`, as verify and the unit tests read them; 8: the job's writer threads (commit.WRITERS)
WRITERS = pytest.mark.parametrize("writers", [1, 8])


@WRITERS
def test_out_of_order_repeated_rows_commit_each_shard_once(tmp_path, writers):
    shards = [Shard("a", "tar", "src-a"), Shard("b", "tar", "src-b")]
    c = ShardCommitter(str(tmp_path), shards, writers=writers)
    a, a_end = engine_rows("a", 10, skipped=2)
    b, b_end = engine_rows("b", 5)
    stream = a + b + a[:4] + b[2:] + [a_end, b_end]  # repeats, as from retried tasks
    random.Random(0).shuffle(stream)
    for i in range(0, len(stream), 3):
        c.add(schema.table(stream[i : i + 3], schema.ENGINE_SCHEMA))
    c.flush()
    assert c.committed == {"a", "b"} and c.uncommitted() == [] and c.duplicates_dropped == 7
    t = pq.read_table(shard_file(str(tmp_path), "a"))
    assert (
        t.column("sample_index").to_pylist() == list(range(10))
        and t.schema.names == schema.OUTPUT_SCHEMA.names
    )
    assert load_progress(str(tmp_path)).complete == {"a", "b"}
    counts = verify_run(str(tmp_path), shards)
    assert counts.rows == 15 and counts.skipped == 2


@WRITERS
def test_shard_waits_for_its_end_marker_and_all_rows(tmp_path, writers):
    c = ShardCommitter(str(tmp_path), [Shard("a", "tar", "src-a")], writers=writers)
    rows, end = engine_rows("a", 3)
    c.add(schema.table(rows[:2] + [end], schema.ENGINE_SCHEMA))
    c.flush()
    assert c.uncommitted() == ["a"] and not load_progress(str(tmp_path)).complete
    c.add(schema.table(rows[2:], schema.ENGINE_SCHEMA))
    c.flush()
    assert c.committed == {"a"}


def test_a_failed_write_on_a_writer_thread_fails_the_job(tmp_path):
    (tmp_path / "run").write_text("a file where the run's folder should be")
    c = ShardCommitter(str(tmp_path / "run"), [Shard("a", "tar", "src-a")], writers=8)
    rows, end = engine_rows("a", 3)
    c.add(schema.table(rows + [end], schema.ENGINE_SCHEMA))  # the merge is queued, not yet written
    with pytest.raises(OSError):
        c.flush()
    assert c.committed == set()
    c.close()


def test_verify_refuses_a_missing_or_wrong_shard(tmp_path):
    shards = [Shard("a", "tar", "src-a"), Shard("b", "tar", "src-b")]
    c = ShardCommitter(str(tmp_path), shards)
    rows, end = engine_rows("a", 3)
    c.add(schema.table(rows + [end], schema.ENGINE_SCHEMA))
    with pytest.raises(RuntimeError, match="src-b has no committed file"):
        verify_run(str(tmp_path), shards)
    t = pq.read_table(shard_file(str(tmp_path), "a"))
    pq.write_table(pa.concat_tables([t, t.slice(0, 1)]), shard_file(str(tmp_path), "a"))
    with pytest.raises(RuntimeError, match="exactly once"):
        verify_run(str(tmp_path), shards[:1])


def _pixels_batch(images):
    rows = [
        {"source": "s", "shard_id": "a", "sample_index": i, "key": f"k{i}", "image": im}
        for i, im in enumerate(images)
    ]
    rows.append(
        {"source": "s", "shard_id": "a", "sample_index": -1, "shard_rows": len(images), "shard_skipped": 0}
    )
    return preprocess_batch(
        schema.table(rows, schema.SAMPLE_SCHEMA), JobConfig(inputs=["x"], output="o").preprocess
    )


def test_caption_stage_with_fake_engine(tmp_path):
    cfg = JobConfig(inputs=["x"], output="o", engine={"backend": "fake"})
    batch = _pixels_batch([encode(draw(1)[0]), b"junk", encode(draw(2)[0]), encode(draw(1)[0])])
    out = CaptionStage(cfg, str(tmp_path)).__call__(batch)
    assert out.schema == schema.ENGINE_SCHEMA
    r = out.to_pylist()
    assert r[0]["caption"].startswith("[fake]") and r[0]["caption"] == r[3]["caption"] != r[2]["caption"]
    assert r[1]["caption"] is None and r[1]["error_kind"] == "not_an_image" and r[1]["model"] == "fake"
    assert r[4]["shard_rows"] == 4 and r[4]["caption"] is None


def test_caption_stage_reuses_known_bytes_without_the_engine(tmp_path, monkeypatch):
    cfg = JobConfig(inputs=["x"], output="o", engine={"backend": "fake"})
    batch = _pixels_batch([encode(draw(1)[0]), encode(draw(2)[0])])
    sha = batch.column("sha256")[0].as_py()

    class Index:  # what reuse.ReuseIndex.lookup answers for a caption an earlier run made
        def lookup(self, q):
            hit = {"sha256": sha, "prompt": cfg.prompt, "caption": "earlier caption", "input_tokens": 5}
            return schema.table([hit | {"output_tokens": 2, "finish_reason": "stop"}], HITS_SCHEMA)

    batch = apply_reuse(batch, Index(), cfg.prompt)
    assert batch.column("pixels")[0].as_py() is None  # a hit's pixels do not travel to the engine
    stage = CaptionStage(cfg, str(tmp_path))
    seen = []
    real = stage.engine.caption
    monkeypatch.setattr(stage.engine, "caption", lambda p, ims: seen.extend(ims) or real(p, ims))
    r = stage(batch).to_pylist()
    assert r[0]["caption"] == "earlier caption" and r[0]["cached"] is True
    assert r[1]["cached"] is False and len(seen) == 1


@WRITERS
def test_parts_survive_a_crash_and_merge_into_the_shard(tmp_path, writers):
    shards = [Shard("a", "tar", "src-a")]
    rows, end = engine_rows("a", 10)
    c = ShardCommitter(str(tmp_path), shards, commit_rows=3, writers=writers)
    c.add(schema.table(rows[:4], schema.ENGINE_SCHEMA))  # 4 >= 3: one part with indices 0..3
    c.add(schema.table(rows[4:5] + rows[:2], schema.ENGINE_SCHEMA))  # repeats dropped, 1 pending row
    c.flush()
    prog = load_progress(str(tmp_path))  # the driver dies here
    assert prog.complete == set() and prog.done_indices == {"a": {0, 1, 2, 3}} and len(prog.parts["a"]) == 1

    c2 = ShardCommitter(str(tmp_path), shards, commit_rows=3, progress=prog, writers=writers)
    # the rerun's reader skips 0..3; index 4 (lost with the dead driver) and the rest come again, one row
    # at a time: with writer threads, the parts they make and the merge that reads them back stay in order
    for r in rows[4:] + [end]:
        c2.add(schema.table([r], schema.ENGINE_SCHEMA))
    c2.flush()
    assert c2.committed == {"a"}
    assert verify_run(str(tmp_path), shards).rows == 10
    assert pq.read_table(shard_file(str(tmp_path), "a")).column("sample_index").to_pylist() == list(range(10))
    assert load_progress(str(tmp_path)).parts == {}  # parts removed after the merge
    assert not list(tmp_path.glob("a.part-*"))


def test_reader_skips_committed_indices_but_counts_them(tmp_path):
    from omnilmm_ray.config import InputConfig
    from omnilmm_ray.readers import read_shard
    from omnilmm_ray.samples import write_tar

    p = write_tar(tmp_path / "s.tar", [(f"k{i}", {"jpg": encode(draw(i)[0])}) for i in range(5)])
    shard = Shard("s", "tar", str(p))
    out = pa.concat_tables(list(read_shard(shard, InputConfig(), skip={0, 2, 3}))).to_pylist()
    assert [r["sample_index"] for r in out[:-1]] == [1, 4] and out[-1]["shard_rows"] == 5


def test_a_write_interrupted_by_a_crash_leaves_a_temporary_file_the_next_attempt_removes(tmp_path):
    c = ShardCommitter(str(tmp_path), [Shard("a", "tar", "src-a")])
    rows, end = engine_rows("a", 3)
    c.add(schema.table(rows + [end], schema.ENGINE_SCHEMA))
    (tmp_path / ".tmp-0123-b.parquet").write_bytes(b"half a file")  # what a kill mid-write leaves
    prog = load_progress(str(tmp_path))
    assert prog.complete == {"a"} and [p.rsplit("/", 1)[-1] for p in prog.orphans] == [".tmp-0123-b.parquet"]


def test_an_actor_that_gives_its_engine_fewer_sequences_than_it_decodes_says_what_to_raise(tmp_path, caplog):
    def hints(engine: dict, scale: dict | None = None, **cfg) -> list[str]:
        caplog.clear()
        scale = {"concurrent_batches": 2, **(scale or {})}
        CaptionStage(
            JobConfig(inputs=["x"], output="o", engine={"backend": "fake", **engine}, scale=scale, **cfg), ""
        )
        return [r.getMessage() for r in caplog.records if "sequences at once" in r.getMessage()]

    # 256 x 2 = 512 images against an engine of 1,024 (lmdeploy's own limit on an H100 or H200)
    (hint,) = hints({"max_batch_size": 1024})
    assert "at most 512 (scale.batch_size 256 x scale.concurrent_batches 2)" in hint
    assert "scale.concurrent_batches: 4 keeps it full" in hint
    assert hints({"max_batch_size": 512}) == [] and hints({}) == []  # enough, or the limit unknown
    defaults = JobConfig(inputs=["x"], output="o")
    assert budget_hint(1024, defaults) is None  # the defaults fill an H100's engine
    # an engine whose calls take turns (lmdeploy's PyTorch engine): more calls in flight do not reach it
    hint = budget_hint(1024, defaults, serial_calls=True)
    assert "at most 256 (scale.batch_size 256, one call at a time)" in hint
    assert "scale.batch_size: 1024 keeps it full" in hint
    prompts = {"short": "Describe briefly.", "tags": "List the objects."}  # two sequences per image
    (hint,) = hints({"max_batch_size": 1536}, prompts=prompts, scale={"batch_size": 128})
    assert "at most 512 (" in hint and "x 2 prompts)" in hint and "concurrent_batches: 6 keeps" in hint
