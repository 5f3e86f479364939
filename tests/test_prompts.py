"""Several named prompts per image, and prompt templates filled from each sample's metadata."""

import json

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from omnilmm_ray import cli, schema
from omnilmm_ray.config import ConfigError, JobConfig, load_config
from omnilmm_ray.prompts import MissingField, parse
from omnilmm_ray.reuse import HITS_SCHEMA, apply_reuse
from omnilmm_ray.samples import build_samples, draw, encode
from omnilmm_ray.stages import CaptionStage
from tests.test_commit_stages import _pixels_batch

PROMPTS = {"alt": "Alt text for this image.", "detailed": "Describe this image in detail.", "tags": "Tags?"}


def test_template_renders_sidecar_and_metadata_fields():
    t = parse("Alt: {text}. Title: {metadata.product.title} ({key}) {{literal}}")
    sample = {"text": "a cat", "key": "k1", "metadata": json.dumps({"product": {"title": "Mug"}})}
    assert t.render(sample, {"product": {"title": "Mug"}}) == "Alt: a cat. Title: Mug (k1) {literal}"
    with pytest.raises(MissingField, match=r"metadata\.product has no field 'title'"):
        t.render(sample, {"product": {}})
    with pytest.raises(MissingField, match="no text"):
        parse("{text}").render({"text": None}, None)
    assert parse("no fields here").fields == []


@pytest.mark.parametrize(
    "bad", ["{title}", "{metadata}", "{text.x}", "{text:>10}", "{metadata..a}", "{", "JSON like {'a': 1}"]
)
def test_bad_templates_fail_at_load_naming_the_field(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"^prompt: "):
        load_config(None, {"input": ["x"], "output": "o", "prompt": bad})


def test_prompts_config_checks_names_and_one_mode(tmp_path):
    p = tmp_path / "job.yaml"
    for body, msg in [
        ("prompts: {Alt Text: hi}", "prompt name 'Alt Text'"),
        ("prompts: {}", "at least one named prompt"),
        ("prompts: {alt: 'Alt {nope}'}", "prompt 'alt': unknown field"),
        ("prompt: hi\nprompts: {alt: hi}", "either `prompt`"),
    ]:
        p.write_text(body)
        with pytest.raises(ConfigError, match=msg):
            load_config(p, {"input": ["x"], "output": "o"})
    p.write_text("prompts: {alt: hi}")
    with pytest.raises(ConfigError, match="either `prompt`"):  # --prompt on the command line too
        load_config(p, {"input": ["x"], "output": "o", "prompt": "other"})


def test_stage_sends_every_prompt_of_an_image_in_one_engine_call(tmp_path, monkeypatch):
    cfg = JobConfig(inputs=["x"], output="o", engine={"backend": "fake"}, prompts=PROMPTS)
    batch = _pixels_batch([encode(draw(1)[0]), b"junk", encode(draw(2)[0])])
    stage = CaptionStage(cfg, str(tmp_path))
    calls = []
    real = stage.engine.caption
    monkeypatch.setattr(stage.engine, "caption", lambda p, ims: calls.append((p, ims)) or real(p, ims))
    out = stage(batch)
    assert out.schema == schema.engine_schema(list(PROMPTS))
    assert len(calls) == 1 and calls[0][0] == list(PROMPTS.values()) * 2
    ims = calls[0][1]
    assert ims[0] is ims[1] is ims[2] and ims[3] is not ims[0]  # one decoded image, three requests
    r = out.to_pylist()
    for name, prompt in PROMPTS.items():
        assert r[0][f"prompt_{name}"] == prompt and r[0][f"caption_{name}"].startswith("[fake]")
        assert r[0][f"flags_{name}"] == [] and r[0][f"finish_reason_{name}"] == "stop"
    assert len({r[0][f"caption_{n}"] for n in PROMPTS}) == 3
    assert r[0]["caption"] is None and r[0]["prompt"] is None
    assert r[0]["input_tokens"] == sum(r[0][f"input_tokens_{n}"] for n in PROMPTS)
    assert r[0]["flags"] == ["tags:too_short"] or r[0]["flags"] == []
    assert r[1]["error_kind"] == "not_an_image" and r[1]["caption_alt"] is None


def test_missing_template_field_is_an_error_row_naming_it(tmp_path):
    cfg = JobConfig(inputs=["x"], output="o", engine={"backend": "fake"}, prompt="Known as {metadata.title}.")
    batch = _pixels_batch([encode(draw(1)[0]), encode(draw(2)[0])])
    rows = batch.to_pylist()
    rows[0]["metadata"] = json.dumps({"title": "A mug"})
    r = CaptionStage(cfg, str(tmp_path))(schema.table(rows, schema.PIXELS_SCHEMA)).to_pylist()
    assert r[0]["prompt"] == "Known as A mug." and r[0]["caption"].startswith("[fake]")
    assert r[1]["error_kind"] == "missing_prompt_field" and "{metadata.title}" in r[1]["error"]
    assert r[1]["caption"] is None


def test_reuse_renders_each_row_and_the_engine_gets_only_the_prompts_not_found(tmp_path, monkeypatch):
    prompts = {"alt": "Alt.", "detailed": "About {text}."}
    cfg = JobConfig(inputs=["x"], output="o", engine={"backend": "fake"}, prompts=prompts)
    rows = _pixels_batch([encode(draw(i)[0]) for i in range(3)]).to_pylist()
    rows[0]["text"], rows[1]["text"] = "a cat", "a dog"  # row 2 has no text: {text} is missing
    sha = [r["sha256"] for r in rows]
    earlier = [(sha[0], "Alt."), (sha[0], "About a cat."), (sha[1], "Alt."), (sha[1], "About a fox.")]

    class Index:  # what reuse.ReuseIndex.lookup answers: earlier captions of the asked pairs
        def lookup(self, q):
            asked = set(zip(q.column("sha256").to_pylist(), q.column("prompt").to_pylist()))
            hits = [
                {"sha256": s, "prompt": p, "caption": f"earlier {p}", "input_tokens": 3} for s, p in earlier
            ]
            return schema.table([h for h in hits if (h["sha256"], h["prompt"]) in asked], HITS_SCHEMA)

    batch = apply_reuse(schema.table(rows, schema.PIXELS_SCHEMA), Index(), cfg.prompt, cfg.prompts)
    assert batch.column("cached").to_pylist() == [True, False, False, False]
    assert [p is not None for p in batch.column("pixels").to_pylist()] == [False, True, False, False]
    assert batch.column("error_kind").to_pylist()[2] == "missing_prompt_field"
    stage = CaptionStage(cfg, str(tmp_path))
    asked = []
    real = stage.engine.caption
    monkeypatch.setattr(stage.engine, "caption", lambda p, ims: asked.extend(p) or real(p, ims))
    r = stage(batch).to_pylist()
    assert asked == ["About a dog."]  # row 1's detailed prompt: its alt text was found
    assert r[0]["cached"] and r[0]["caption_detailed"] == "earlier About a cat." and r[0]["input_tokens"] == 6
    assert r[0]["flags_alt"] is not None and r[0]["prompt_alt"] == "Alt."
    assert not r[1]["cached"] and r[1]["caption_alt"] == "earlier Alt."
    assert r[1]["caption_detailed"].startswith("[fake]") and r[1]["prompt_detailed"] == "About a dog."
    assert r[2]["error_kind"] == "missing_prompt_field" and r[2]["error"].count("{text}") == 1
    assert r[2]["caption_alt"] is None and not r[2]["cached"]


@pytest.mark.integration
def test_multi_prompt_job_on_s3(ray_local, s3, tmp_path):
    build_samples(tmp_path / "in", shards=2, per_shard=5)
    s3.mkdir("prompts-in")
    s3.mkdir("prompts-out")
    s3.put(str(tmp_path / "in") + "/", "prompts-in/data/", recursive=True)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({"prompts": PROMPTS, "engine": {"backend": "fake"}}))
    out = "s3://prompts-out/multi"
    assert (
        cli.main(["--config", str(cfg), "--input", "s3://prompts-in/data/webdataset", "--output", out]) == 0
    )
    runs = [p for p in s3.ls("prompts-out/multi") if p.rsplit("/", 1)[-1].startswith("run=")]
    t = pads.dataset(runs[0], filesystem=s3, format="parquet").to_table()
    assert t.num_rows == 10 and t.column("error").null_count == 10
    assert {f"caption_{n}" for n in PROMPTS} <= set(t.column_names)
    df = t.to_pandas()
    assert df["caption_alt"].str.startswith("[fake]").all() and (df["prompt_tags"] == "Tags?").all()
    summary = json.loads(s3.cat_file(f"{runs[0]}/_summary.json"))
    assert summary["counts"]["ok"] == 10 and "quality" in summary
    # the latest view of a multi-prompt output keeps its per-prompt columns
    from omnilmm_ray.table import OutputTable, latest_to_parquet

    latest = OutputTable(out).read_latest()
    assert latest.num_rows == 10
    assert sorted(latest.column("caption_alt").to_pylist()) == sorted(df["caption_alt"])
    assert latest_to_parquet(out, str(tmp_path / "latest.parquet")) == 10
    assert "caption_tags" in pq.read_schema(tmp_path / "latest.parquet").names
    # the same output with other prompts is another labelling configuration
    cfg.write_text(json.dumps({"prompts": {"alt": "Other."}, "engine": {"backend": "fake"}}))
    assert (
        cli.main(["--config", str(cfg), "--input", "s3://prompts-in/data/webdataset", "--output", out]) == 2
    )


@pytest.mark.integration
def test_templated_prompt_job_local(ray_local, tmp_path):
    build_samples(tmp_path / "in", shards=1, per_shard=6)
    cfg = tmp_path / "job.yaml"
    cfg.write_text("prompt: 'The alt text was: {text}. Describe the image.'\nengine: {backend: fake}\n")
    out = tmp_path / "out"
    inputs = ["--input", str(tmp_path / "in" / "webdataset"), "--input", str(tmp_path / "in" / "parquet")]
    assert cli.main(["--config", str(cfg), *inputs, "--output", str(out)]) == 0
    run = sorted(out.glob("run=*"))[-1]
    rows = pads.dataset(str(run), format="parquet").to_table().to_pylist()
    tar_rows = [r for r in rows if r["source"].endswith(".tar")]
    assert len(tar_rows) == 6 and all(r["error"] is None for r in tar_rows)
    assert all(r["prompt"] == f"The alt text was: {r['text']}. Describe the image." for r in tar_rows)
    # Parquet rows have no .txt sidecar: one error row each, naming the field
    pq_rows = [r for r in rows if r["source"].endswith(".parquet")]
    assert len(pq_rows) == 6 and all(r["error_kind"] == "missing_prompt_field" for r in pq_rows)
    assert "{text}" in pq_rows[0]["error"]
    summary = json.loads((run / "_summary.json").read_text())
    assert summary["errors_by_kind"]["missing_prompt_field"]["count"] == 6
    # a Parquet column as the field
    cfg.write_text("prompt: 'Known as: {metadata.caption}.'\nengine: {backend: fake}\n")
    out2 = tmp_path / "out2"
    assert (
        cli.main(["--config", str(cfg), "--input", str(tmp_path / "in" / "parquet"), "--output", str(out2)])
        == 0
    )
    t = pq.read_table(next((sorted(out2.glob("run=*"))[-1]).glob("*.parquet"))).to_pylist()
    assert all(r["error"] is None and r["prompt"].startswith("Known as: a ") for r in t)
