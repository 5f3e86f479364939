"""Config loading: YAML + CLI overrides, and errors that name the field."""

import pytest

from omnilmm_ray.config import ConfigError, load_config


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
