"""Quality flags on hand-made captions, the retry policy in the engine stage, and a fake-engine job whose
known-bad captions show up as flags and summary counts."""

import json
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from omnilmm_ray import schema
from omnilmm_ray.config import ConfigError, JobConfig, QualityConfig, load_config
from omnilmm_ray.engines.fake import BAD_CAPTIONS
from omnilmm_ray.quality import caption_flags, repeated_ngram_share
from omnilmm_ray.samples import build_samples, draw, encode
from omnilmm_ray.schema import FLAGS
from omnilmm_ray.stages import CaptionStage
from tests.test_commit_stages import _pixels_batch

Q = QualityConfig()
PROMPT = "Describe this image in one detailed sentence."
GOOD = "A red bicycle leans against a brick wall on a quiet street."


def flags(text, finish="stop", prompt=PROMPT, cfg=Q, name=""):
    return caption_flags(text, finish, prompt, cfg, name)


@pytest.mark.parametrize(
    "flag, bad, good",
    [
        ("empty", "   \n", GOOD),
        ("truncated", ("A red bicycle leans against a", "length"), (GOOD, "stop")),
        ("repetition", "a cat a cat a cat", "a cat sits next to a dog on a sofa"),
        ("repetition", "the dog runs, the dog runs, the dog runs, the dog runs", GOOD),
        ("repetition", "aaaaaaaaaaaaaaaaaaaaaaaa", GOOD),
        ("refusal", "I'm sorry, but I can't describe people.", GOOD),
        ("refusal", "As an AI language model, I see a street.", GOOD),
        ("refusal", "I cannot determine what this shows.", GOOD),
        ("refusal", PROMPT + " A bicycle.", "Describe: a bicycle leans against a wall."),
        ("too_short", "ok", "A red bike."),
        ("unexpected_script", "Красный велосипед у стены.", "A red vélo près du mur."),
        ("unexpected_script", "一辆红色自行车靠在墙上", GOOD),
    ],
)
def test_each_flag_positive_and_negative(flag, bad, good):
    bad, bad_finish = bad if isinstance(bad, tuple) else (bad, "stop")
    good, good_finish = good if isinstance(good, tuple) else (good, "stop")
    assert flag in flags(bad, bad_finish), bad
    assert flags(good, good_finish) == [], good
    assert flag in FLAGS


def test_thresholds_come_from_the_config():
    text = "a cat a cat a cat"
    assert repeated_ngram_share(text, 3) == 0.5
    assert "repetition" not in flags(text, cfg=QualityConfig(repetition_threshold=0.6))
    per_prompt = QualityConfig(min_chars={"tags": 3, "detailed": 40})
    assert flags("cat, sofa", cfg=per_prompt, name="tags") == []
    assert flags(GOOD[:30], cfg=per_prompt, name="detailed") == ["too_short"]
    assert flags("ok", cfg=per_prompt, name="alt") == ["too_short"]  # unnamed prompts: the default 10
    assert flags("一辆红色自行车靠在墙上", cfg=QualityConfig(expected_scripts=["cjk"])) == []
    assert flags("一辆红色自行车靠在墙上", cfg=QualityConfig(expected_scripts=[])) == []
    assert flags("I'm sorry", cfg=QualityConfig(refusal_patterns=[], min_chars=1)) == []


def test_bad_quality_config_names_the_field(tmp_path):
    p = tmp_path / "job.yaml"
    for body, field in [
        ("quality: {retry_flags: [typo]}", "quality.retry_flags"),
        ("quality: {refusal_patterns: ['(unclosed']}", "quality.refusal_patterns"),
        ("quality: {retry_generation: {max_new_tokens: 0}}", "quality.retry_generation"),
    ]:
        p.write_text(body)
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(p, {"input": ["x"], "output": "o"})


def _bad_batch(n=21):
    return _pixels_batch([encode(draw(i)[0]) for i in range(n)])


def test_fake_bad_captions_are_flagged_and_retry_keeps_both_attempts(tmp_path):
    bad = {"backend": "fake", "fake_bad_captions": True}
    plain = CaptionStage(JobConfig(inputs=["x"], output="o", engine=bad), str(tmp_path))(_bad_batch())
    assert plain.schema == schema.ENGINE_SCHEMA
    rows = [r for r in plain.to_pylist() if r["shard_rows"] is None]
    kinds = {}
    for r in rows:
        kind = next((k for k, v in BAD_CAPTIONS.items() if v and v[0] == r["caption"]), "good")
        kinds[kind] = kinds.get(kind, 0) + 1
        assert kind in r["flags"] or (kind == "good" and r["flags"] == []), (kind, r)
        assert r["first_caption"] is None and r["first_flags"] is None
        assert (r["error_kind"] == "empty_caption") == (kind == "empty")
    assert len(kinds) >= 5, kinds  # the drill really gives several kinds of bad captions

    cfg = JobConfig(
        inputs=["x"], output="o", engine=bad, quality={"retry_flags": ["repetition", "refusal", "empty"]}
    )
    retried = [
        r for r in CaptionStage(cfg, str(tmp_path))(_bad_batch()).to_pylist() if r["shard_rows"] is None
    ]
    for before, after in zip(rows, retried):
        if {"repetition", "refusal", "empty"} & set(before["flags"]):
            assert after["first_caption"] == before["caption"] and after["first_flags"] == before["flags"]
            # the fake mends everything but a refusal under the retry's settings
            assert after["flags"] == (["refusal"] if "refusal" in before["flags"] else [])
            assert after["error_kind"] is None
        else:
            assert after["first_caption"] is None and after["caption"] == before["caption"]


@pytest.mark.integration
def test_fake_bad_job_shows_flags_and_summary_counts(ray_local, tmp_path):
    build_samples(tmp_path / "in", shards=2, per_shard=14)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "engine: {backend: fake, fake_bad_captions: true}\n"
        "quality: {retry_flags: [repetition], error_budget_flags: [refusal]}\n"
        "sink: {max_error_rate: 0.99}\n"
    )
    from omnilmm_ray import cli

    out = tmp_path / "out"
    assert (
        cli.main(["--config", str(cfg), "--input", str(tmp_path / "in" / "webdataset"), "--output", str(out)])
        == 0
    )
    run = sorted(Path(out).glob("run=*"))[-1]
    t = pads.dataset(str(run), format="parquet").to_table().to_pylist()
    summary = json.loads((run / "_summary.json").read_text())
    q = summary["quality"]
    by_flag = {}
    for r in t:
        for f in r["flags"]:
            by_flag[f] = by_flag.get(f, 0) + 1
    assert q["by_flag"] == by_flag and len(by_flag) >= 4
    assert "repetition" not in by_flag  # every repetition was mended by the retry
    assert q["retried"] == q["mended_by_retry"] == sum(1 for r in t if r["first_caption"]) > 0
    assert all("repetition" in r["first_flags"] for r in t if r["first_caption"])
    assert q["flagged_rows"] == summary["counts"]["flagged"] == sum(1 for r in t if r["flags"])
    refusals = sum(1 for r in t if "refusal" in r["flags"] and r["error"] is None)
    assert q["counted_as_errors"] == refusals > 0
    assert summary["error_rate"] == (summary["counts"]["error"] + refusals) / len(t)

    # the same flags as error budget with the default rate: the run fails (exit 3) but keeps its rows
    cfg.write_text(
        "engine: {backend: fake, fake_bad_captions: true}\nquality: {error_budget_flags: [refusal]}\nsink: {max_error_rate: 0.01}\n"
    )
    assert (
        cli.main(
            [
                "--config",
                str(cfg),
                "--input",
                str(tmp_path / "in" / "webdataset"),
                "--output",
                str(tmp_path / "out2"),
            ]
        )
        == 3
    )
