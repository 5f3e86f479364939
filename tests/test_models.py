"""models.py: which engine captions a model, decided from its config alone (the dry run, no lmdeploy)."""

import json
import re
from pathlib import Path

import pytest

from omnilmm_ray import cli
from omnilmm_ray.models import FAMILIES, OWN, Refused, check, cpu_processor, markdown_table, route

# Trimmed copies of the published config.json / preprocessor_config.json (tests/data/models/README.md)
MODELS = Path(__file__).parent / "data" / "models"


def dry_run(capsys, model: Path, *args: str) -> tuple[int, dict | None, str]:
    rc = cli.main(["--dry-run", "--model", str(model), *args])
    out, err = capsys.readouterr()
    return rc, json.loads(out)["dry_run"] if rc == 0 else None, err


@pytest.mark.parametrize(
    "name, backend, on_cpu",
    [
        ("Qwen2.5-VL-7B-Instruct", "turbomind", True),
        ("InternVL3-2B-hf", "turbomind", False),
        ("Qwen3-VL-2B-Instruct", "pytorch", False),
        ("llava-1.5-7b-hf", "pytorch", False),
    ],
)
def test_dry_run_routes_a_config_only_folder(capsys, name, backend, on_cpu):
    rc, plan, _ = dry_run(capsys, MODELS / name)
    assert rc == 0
    model = plan["model"]
    assert model["backend"] == backend and model["processor_on_cpu_workers"] is on_cpu
    assert model["family"] and model["quantization"] is None and model["lmdeploy"] == "0.18.0"
    assert set(plan) == {"model"}, "no inputs, no output: the model alone is checked"


def test_dry_run_names_an_awq_model_served_by_turbomind(capsys):
    rc, plan, _ = dry_run(capsys, MODELS / "Qwen2.5-VL-7B-Instruct-AWQ")
    assert rc == 0
    assert plan["model"]["backend"] == "turbomind" and plan["model"]["quantization"] == "awq int4 (group 128)"


@pytest.mark.parametrize(
    "name, why",
    [
        ("MiniCPM-Llama3-V-2_5", "drops the image"),
        ("Llama-3.2-11B-Vision-Instruct", "removed"),
        ("Qwen2.5-7B-Instruct", "not a vision-language model"),
    ],
)
def test_dry_run_refuses_a_model_no_engine_captions_from_the_image(capsys, name, why):
    rc, _, err = dry_run(capsys, MODELS / name)
    assert rc == 2
    (line,) = [x for x in err.splitlines() if x.strip()]  # one line
    assert line.startswith("error: engine.model:") and name in line and why in line
    assert "lmdeploy 0.18.0" in line and "use a family" in line


def test_dry_run_with_inputs_but_no_output_still_asks_for_the_output(capsys, tmp_path):
    rc = cli.main(["--dry-run", "--model", str(MODELS / "Qwen2.5-VL-7B-Instruct"), "--input", str(tmp_path)])
    assert rc == 2 and "output: missing" in capsys.readouterr().err


def test_dry_run_with_inputs_describes_the_model_beside_the_shards(capsys, tmp_path):
    from omnilmm_ray.samples import build_samples

    build_samples(tmp_path / "in", shards=1, per_shard=2)
    args = ["--input", str(tmp_path / "in" / "webdataset"), "--output", str(tmp_path / "out")]
    rc, plan, _ = dry_run(capsys, MODELS / "llava-1.5-7b-hf", *args)
    assert rc == 0 and plan["shards"] == 1 and plan["model"]["backend"] == "pytorch"


def test_a_hub_id_the_driver_cannot_read_is_left_to_the_engine(capsys):
    rc, plan, _ = dry_run(capsys, Path("Qwen/Qwen2-VL-2B-Instruct"))
    assert rc == 0 and plan["model"]["family"] is None


def _config(name: str) -> dict:
    return json.loads((MODELS / name / "config.json").read_text())


def test_internvl_goes_to_turbomind_only_with_a_language_model_turbomind_has():
    internvl = _config("InternVL3-2B-hf")
    assert route(internvl, "m").backend == "turbomind"
    # InternVL2-4B's language model is Phi-3: TurboMind's InternVL would fail to build it
    phi = {**internvl, "text_config": {**internvl["text_config"], "architectures": ["Phi3ForCausalLM"]}}
    assert route(phi, "m").backend == "pytorch"
    with pytest.raises(Refused, match="TurboMind does not support 'm' \\(its language model Phi3ForCausalLM"):
        route(phi, "m", "turbomind")


def test_quantisation_decides_the_engine():
    qwen = _config("Qwen2.5-VL-7B-Instruct")

    def quant(**q):
        return {**qwen, "quantization_config": q}

    assert (
        route(quant(quant_method="awq", bits=4, group_size=128, version="gemm"), "m").backend == "turbomind"
    )
    # W8A8 (lmdeploy's smooth_quant) is read by the PyTorch engine only
    w8a8 = route(quant(quant_method="smooth_quant", bits=8), "m")
    assert w8a8.backend == "pytorch" and w8a8.processor is None
    # GPTQ with act-order: TurboMind asserts on it (turbomind/converter.py), the PyTorch engine has no GPTQ
    with pytest.raises(Refused, match="neither engine reads its gptq"):
        route(quant(quant_method="gptq", bits=4, group_size=128, desc_act=True), "m")
    assert (
        route(quant(quant_method="gptq", bits=4, group_size=128, desc_act=False), "m").backend == "turbomind"
    )


def test_the_processor_runs_on_the_cpu_workers_only_where_the_engine_takes_patches():
    qwen = MODELS / "Qwen2.5-VL-7B-Instruct"
    spec = cpu_processor(str(qwen))
    # Qwen2.5-VL's published processor is Qwen2-VL's, with the same budget
    assert (spec.arch, spec.patch_size, spec.merge_size, spec.temporal_patch_size) == (
        "Qwen2_5_VLForConditionalGeneration",
        14,
        2,
        2,
    )
    assert (spec.min_pixels, spec.max_pixels, spec.dtype) == (3136, 12845056, "bfloat16")
    # an AWQ checkpoint's vision tower is not quantised: its processor runs on the CPU workers too, making
    # float16 patches as TurboMind runs AWQ in float16
    awq = str(MODELS / "Qwen2.5-VL-7B-Instruct-AWQ")
    assert cpu_processor(awq).dtype == "float16" and check(awq)["processor_on_cpu_workers"] is True
    assert cpu_processor(str(qwen), "fake") is not None
    assert cpu_processor(str(qwen), "pytorch") is None
    assert cpu_processor(str(MODELS / "InternVL3-2B-hf")) is None
    assert cpu_processor(str(MODELS / "MiniCPM-Llama3-V-2_5")) is None  # refused: the engine actor says why


def test_every_family_routes_to_its_own_backend_or_is_refused():
    for f in FAMILIES:
        for arch in f.archs:
            config = {"architectures": [arch], "text_config": {"architectures": ["Qwen2ForCausalLM"]}}
            if f.vision_key:
                config[f.vision_key] = {}
            if f.refusal:
                with pytest.raises(Refused):
                    route(config, "m")
            else:
                assert route(config, "m").backend == f.backend, arch
    assert OWN.turbomind >= {a for f in FAMILIES if f.backend == "turbomind" for a in f.archs}


def test_the_readme_models_table_is_the_family_table():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    found = re.search(r"<!-- models table: .*?-->\n(.*?)\n\n", readme, re.S)
    assert found, "README.md 'Models' holds the table from `python -m omnilmm_ray.models`"
    assert found.group(1) == markdown_table()
