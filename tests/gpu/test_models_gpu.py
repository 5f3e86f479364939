"""models.py's own table against the lmdeploy installed here: the dry run (no lmdeploy) and the job (lmdeploy's
lists) must route every architecture the same way, so the two cannot drift apart silently."""

import inspect
from pathlib import Path

import pytest

from omnilmm_ray import models
from omnilmm_ray.config import EngineConfig

pytestmark = pytest.mark.gpu

FIXTURES = Path(__file__).parents[1] / "data" / "models"


def _config(arch: str) -> dict:
    """The smallest config lmdeploy's check_vl_llm and models.route decide on for `arch`."""
    config = {"architectures": [arch], "text_config": {"architectures": ["Qwen2ForCausalLM"]}}
    if arch == "DeepseekVLV2ForCausalLM":  # a VLM by its language model (lmdeploy/archs.py check_vl_llm)
        config.update(language_config={"architectures": ["DeepseekV2ForCausalLM"]}, vision_config={})
    if arch.startswith("ChatGLM"):  # GLM-4V: ChatGLM with a vision_config
        config["vision_config"] = {}
    return config


def _outcome(config: dict, lists) -> str:
    try:
        return models.route(config, "m", "auto", lists).backend
    except models.Refused:
        return "refused"


def test_the_family_table_routes_like_lmdeploy():
    import lmdeploy
    from lmdeploy.archs import check_vl_llm
    from lmdeploy.pytorch.models.module_map import MODULE_MAP, REMOVED_MODEL_MAP
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS

    from omnilmm_ray.engines.lmdeploy_engine import lmdeploy_lists

    assert lmdeploy.__version__ == models.LMDEPLOY, "the table mirrors this lmdeploy: read its lists again"
    live = lmdeploy_lists()
    archs = set(SUPPORTED_ARCHS) | set(MODULE_MAP) | set(REMOVED_MODEL_MAP)
    archs |= {a for f in models.FAMILIES for a in f.archs}
    differ = {a: (_outcome(_config(a), models.OWN), _outcome(_config(a), live)) for a in sorted(archs)}
    differ = {a: d for a, d in differ.items() if d[0] != d[1]}
    assert not differ, f"(models.py, lmdeploy) disagree: {differ}"
    text = {a for a in SUPPORTED_ARCHS if not check_vl_llm("turbomind", {"architectures": [a]})}
    assert text == models.TURBOMIND_TEXT, "TurboMind's text models (an InternVL's language model must be one)"


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_published_configs_route_like_lmdeploy(name):
    """The dry run on a config-only folder, against lmdeploy reading the same folder."""
    from omnilmm_ray.engines.lmdeploy_engine import resolve

    folder = str(FIXTURES / name)
    try:
        ours = models.check(folder)["backend"]
    except models.Refused:
        ours = "refused"
    try:
        theirs = resolve(EngineConfig(model=folder)).backend
    except ValueError:
        theirs = "refused"
    assert ours == theirs


def test_why_minicpm_v_is_refused_still_holds():
    """lmdeploy 0.18 serves MiniCPM-V with its language model only: TurboMind does not list it, and the
    PyTorch engine's model skips the vision weights and has no input processor, so the engine drops the
    image (pytorch/engine/engine.py: 'Do not support Multimodal inputs.'). Should that change, revisit the
    refusal in models.py."""
    from lmdeploy.pytorch.models.minicpmv26 import MiniCPMVForCausalLM
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS

    assert "MiniCPMV" not in SUPPORTED_ARCHS
    assert "'vpm' in name" in inspect.getsource(MiniCPMVForCausalLM.load_weights)
    assert not hasattr(MiniCPMVForCausalLM, "get_input_processor")
