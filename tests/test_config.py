"""Config loading: YAML + CLI overrides, and errors that name the field."""

import json

import pytest
import yaml

from omnilmm_ray import cli
from omnilmm_ray.config import ConfigError, JobConfig, generation_fingerprint, load_config
from omnilmm_ray.storage import write_json
from omnilmm_ray.table import OutputTable


def test_cli_wins_over_yaml(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("inputs: [a]\noutput: o\nscale: {batch_size: 8, max_actors: 4}\nengine: {backend: fake}\n")
    cfg = load_config(f, {"batch_size": 16, "input": None, "model": "m"})
    assert cfg.scale.batch_size == 16 and cfg.scale.max_actors == 4 and cfg.inputs == ["a"]
    assert cfg.engine.model == "m" and cfg.engine.backend == "fake"


@pytest.mark.parametrize(
    "overrides, yaml_text, needle",
    [
        ({"batch_size": 0}, "", "scale.batch_size"),
        ({"engine": "vllm"}, "", "engine.backend"),
        ({}, "engine: {tpp: 2}\n", "engine.tpp"),
        ({}, "scale: {min_actors: 3, max_actors: 1}\n", "max_actors"),
        ({}, "engine: {fake_caption_tokens: [48, 16]}\n", "engine.fake_caption_tokens"),
        ({"max_error_rate": 2.0}, "", "sink.max_error_rate"),
    ],
)
def test_bad_values_name_the_field(tmp_path, overrides, yaml_text, needle):
    f = tmp_path / "job.yaml"
    f.write_text("inputs: [a]\noutput: o\n" + yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(f, overrides)
    assert needle in str(e.value)


def test_missing_input_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="inputs: missing; pass --input"):
        load_config(None, {"output": "o"})
    with pytest.raises(ConfigError, match="cannot read YAML"):
        load_config(tmp_path / "nope.yaml", {})


def test_example_config_is_valid():
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "cluster" / "job.example.yaml", {})
    assert cfg.scale.max_actors == 8 and cfg.sink.max_error_rate == 0.05


def test_print_config_prints_the_effective_config_as_yaml_with_secrets_masked(tmp_path, capsys):
    f = tmp_path / "job.yaml"
    f.write_text(
        "scale: {batch_size: 8}\nsink: {storage_options: {secret: hunter2-secret, endpoint_url: http://x}}\n"
        "report: {progress_s: 5}\n"
    )
    assert cli.main(["--print-config", "--config", str(f), "--batch-size", "16", "--prompt", "P"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out
    cfg = yaml.safe_load(out)
    assert cfg["scale"]["batch_size"] == 16 and cfg["prompt"] == "P"  # the flag wins over the file
    assert cfg["report"]["progress_s"] == 5 and cfg["engine"]["model"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert cfg["sink"]["storage_options"] == {"secret": "***", "endpoint_url": "***"}
    assert cfg["inputs"] == ["<not set: --input>"] and cfg["output"] == "<not set: --output>"
    assert cli.main(["--print-config", "--batch-size", "0"]) == 2
    assert "scale.batch_size" in capsys.readouterr().err


def test_print_schema_prints_the_json_schema(capsys):
    assert cli.main(["--print-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "report" in schema["properties"] and "ReportConfig" in schema["$defs"]


def test_other_prompt_names_on_an_output_are_refused_naming_the_difference(tmp_path):
    """A prompt's text, the model and generation settings may change on an output (test_settings_change.py);
    the prompt names may not: they are the table's columns."""
    out = tmp_path / "out"
    earlier = JobConfig(inputs=["a"], output=str(out), prompts={"alt": "Alt text."})
    table = OutputTable(str(out))
    write_json(
        table.fs,
        f"{out}/run=20260101T000000000000Z/_plan.json",
        {"fingerprint": generation_fingerprint(earlier), "shards": []},
    )
    now = load_config(
        None, {"input": ["a"], "output": str(out), "prompt": "Say what you see.", "max_new_tokens": 7}
    )
    with pytest.raises(ConfigError) as e:
        table.open_run(now, write=False)
    msg = str(e.value)
    assert "other prompt names" in msg and "prompts.alt: 'Alt text.' -> None" in msg
    assert "generation.max_new_tokens: 96 -> 7" in msg
    assert "temperature" not in msg and "engine.model" not in msg  # unchanged settings are not listed
    renamed = JobConfig(inputs=["a"], output=str(out), prompts={"short": "Alt text."})
    with pytest.raises(ConfigError, match="other prompt names"):
        table.open_run(renamed, write=False)
