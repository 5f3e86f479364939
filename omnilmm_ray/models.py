"""Which engine captions a model, and how: model folder -> family, backend, CPU-side processor, or refusal.

The one place that decides a model's path. `route` takes the model's config.json and lmdeploy's lists of
what it serves: on a GPU worker the lists lmdeploy itself has (engines/lmdeploy_engine.py), anywhere else
this module's own table, read from lmdeploy 0.18.0's source (`turbomind/supported_models.py`,
`pytorch/models/module_map.py`, `archs.check_vl_llm`); tests/gpu/test_models_gpu.py checks the two agree.
So `--dry-run --model PATH` names the backend on a machine without lmdeploy (a Ray head), from a folder
holding only config.json and preprocessor_config.json. Adding a family: a `Family` row here, its processor
in vision.py (if the CPU workers run it), its tests. The README's Models table is `markdown_table()`.

Pure: no lmdeploy, torch or transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omnilmm_ray import quantization

LMDEPLOY = "0.18.0"  # the lmdeploy whose lists FAMILIES mirrors (pyproject's `gpu` extra pins it)
INSTEAD = "use a family README 'Models' lists as run on a GPU, e.g. Qwen2.5-VL or InternVL3 (-hf)"
PATCH_BACKENDS = ("turbomind", "fake")  # engines that take the CPU workers' patches (engines/*)


@dataclass(frozen=True)
class Family:
    name: str
    archs: tuple[str, ...]  # config.json `architectures[0]`
    backend: str | None  # what lmdeploy picks under engine.backend=auto; None: refused
    processor: str | None = None  # the image processor the CPU workers run (vision.PROCESSORS)
    gpu_run: str | None = None  # when this project's GPU tests last captioned with it (tests/gpu)
    refusal: str | None = None  # why no engine captions it from the image
    notes: str = ""
    vision_key: str | None = None  # config key marking the VLM, for an arch text-only models share


_REFUSED = (
    Family(
        "MiniCPM-V 2.5 / 2.6",
        ("MiniCPMV",),
        None,
        refusal="TurboMind no longer lists MiniCPMV, and the PyTorch engine loads only its language model "
        "(minicpmv26.py skips the vpm/resampler weights) and drops the image ('Do not support Multimodal "
        "inputs.'): its captions would not see the image",
        notes="refused (exit 2): lmdeploy 0.18 drops the image",
    ),
    Family(
        "Llama 3.2 Vision",
        ("MllamaForConditionalGeneration",),
        None,
        refusal="lmdeploy removed it (pytorch/models/module_map.py REMOVED_MODEL_MAP)",
        notes="refused (exit 2): removed from lmdeploy",
    ),
)
FAMILIES: tuple[Family, ...] = (
    Family(
        "Qwen2-VL",
        ("Qwen2VLForConditionalGeneration",),
        "turbomind",
        "qwen2_vl",
        gpu_run="2026-12-07",
        notes="patches identical to transformers' processor",
    ),
    Family(
        "Qwen2.5-VL",
        ("Qwen2_5_VLForConditionalGeneration",),
        "turbomind",
        "qwen2_vl",
        gpu_run="2026-12-07",
        notes="same image processor as Qwen2-VL; AWQ int4 served by TurboMind (float16 patches)",
    ),
    Family(
        "Qwen3.5",
        ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"),
        "turbomind",
        gpu_run="2026-12-07",
        notes="patch 16; the engine runs its processor",
    ),
    Family(
        "InternVL (-hf, chat, Intern-S1)",
        ("InternVLForConditionalGeneration", "InternVLChatModel", "InternS1ForConditionalGeneration"),
        "turbomind",
        gpu_run="2026-12-07",
        notes="TurboMind only when its language model's arch is one TurboMind has (InternVL3: Qwen2, "
        "3.5: Qwen3), else PyTorch; tiles of 448 px; run on GPU: InternVL3-hf",
    ),
    Family(
        "Intern-S2",
        ("InternS2MobiusForConditionalGeneration", "InternS2PreviewForConditionalGeneration"),
        "turbomind",
    ),
    Family(
        "Qwen3-VL",
        ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"),
        "pytorch",
        gpu_run="2026-12-07",
    ),
    Family(
        "LLaVA (-hf), LLaVA-NeXT",
        ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"),
        "pytorch",
        gpu_run="2026-12-07",
        notes="run on GPU: LLaVA-1.5-hf",
    ),
    Family("Gemma 3", ("Gemma3ForConditionalGeneration",), "pytorch"),
    Family("GLM-4.1V", ("Glm4vForConditionalGeneration",), "pytorch"),
    Family("Phi-3-vision", ("Phi3VForCausalLM",), "pytorch", notes="needs engine.trust_remote_code"),
    Family("Llama 4", ("Llama4ForConditionalGeneration",), "pytorch"),
    Family("CogVLM", ("CogVLMForCausalLM",), "pytorch", notes="needs engine.trust_remote_code"),
    Family("Qwen3-Omni", ("Qwen3OmniMoeForConditionalGeneration",), "pytorch"),
    Family(
        "Intern-S1-Pro, Intern-S2 (causal)",
        (
            "InternS1ProForConditionalGeneration",
            "InternS1_1_ForConditionalGeneration",
            "InternS2MobiusForCausalLM",
            "InternS2PreviewForCausalLM",
        ),
        "pytorch",
    ),
    Family("Kimi K2.5", ("KimiK25ForConditionalGeneration", "Kimi_K25ForConditionalGeneration"), "pytorch"),
    Family("GLM-4V", ("ChatGLMForConditionalGeneration",), "pytorch", vision_key="vision_config"),
    Family("DeepSeek-VL2", ("DeepseekVLV2ForCausalLM",), "pytorch", vision_key="language_config"),
    *_REFUSED,
)
# TurboMind's text architectures: an InternVL's language model must be one of them (turbomind/models/internvl.py)
TURBOMIND_TEXT = frozenset(
    "Qwen2ForCausalLM Qwen2MoeForCausalLM Qwen3ForCausalLM Qwen3MoeForCausalLM LlamaForCausalLM "
    "InternLM2ForCausalLM InternLM3ForCausalLM Glm4MoeLiteForCausalLM GptOssForCausalLM MixtralForCausalLM".split()
)
_INTERNVL = ("InternVLForConditionalGeneration", "InternVLChatModel", "InternS1ForConditionalGeneration")


@dataclass(frozen=True)
class Lists:
    """What one lmdeploy serves: TurboMind's architectures (VLMs and text models), the PyTorch engine's
    VLMs and the removed ones (each a set, or a function giving it: the PyTorch engine's list is imported
    only when needed), and `vlm`, lmdeploy's own "is this config a VLM" (None: FAMILIES decides)."""

    turbomind: frozenset[str]
    pytorch: frozenset[str] | Callable[[], frozenset[str]]
    removed: frozenset[str] | Callable[[], frozenset[str]]
    version: str = LMDEPLOY
    vlm: Callable[[dict], bool] | None = None


def _own_lists() -> Lists:
    by = {b: {a for f in FAMILIES if f.backend == b for a in f.archs} for b in ("turbomind", "pytorch")}
    # every TurboMind VLM also has a PyTorch-engine implementation in lmdeploy 0.18 (module_map.py)
    return Lists(
        turbomind=frozenset(by["turbomind"] | TURBOMIND_TEXT),
        pytorch=frozenset(by["pytorch"] | by["turbomind"] | {"MiniCPMV"}),
        removed=frozenset({"MllamaForConditionalGeneration"}),
    )


OWN = _own_lists()


class Refused(ValueError):
    """No engine captions this model from the image; the message names the model and what to use."""


@dataclass(frozen=True)
class Route:
    model: str
    arch: str
    family: str | None
    backend: str  # turbomind | pytorch | fake
    processor: str | None  # the image processor the CPU workers run for this backend, None: the engine's
    quantization: dict | None
    gpu_run: str | None
    lmdeploy: str

    @property
    def proven(self) -> bool:
        """This family captioned from the image in this project's GPU tests, with this lmdeploy."""
        return self.gpu_run is not None and self.lmdeploy == LMDEPLOY

    def describe(self) -> dict:
        return {
            "model": self.model,
            "family": self.family,
            "architecture": self.arch,
            "backend": self.backend,
            "processor_on_cpu_workers": self.processor is not None,
            "quantization": quantization.name(self.quantization),
            "run_on_gpu": self.gpu_run,
            "lmdeploy": self.lmdeploy,
        }


def family_of(config: dict) -> Family | None:
    arch = _arch(config)
    for f in FAMILIES:
        if arch in f.archs and (f.vision_key is None or f.vision_key in config):
            return f
    return None


def _arch(config: dict) -> str:
    return (config.get("architectures") or [""])[0]


def _refuse(model: str, what: str, why: str, version: str) -> Refused:
    return Refused(f"engine.model: {model!r} ({what}) with lmdeploy {version}: {why}; {INSTEAD}")


def route(config: dict, model: str, backend: str = "auto", lists: Lists = OWN) -> Route:
    """The engine that captions `model` (its config.json as a dict) from the image; raises Refused (a
    ValueError naming the model, the lmdeploy version and what to use instead) when none does.

    `backend`: engine.backend as configured; "fake" describes the model without refusing it."""
    arch, fam, quant = _arch(config), family_of(config), quantization.summary(config)
    what = f"{fam.name}, {arch}" if fam else arch or "no architectures in config.json"

    def done(chosen: str) -> Route:
        # Quantised checkpoints too: their vision tower is not quantised and its patches come in the dtype
        # TurboMind runs the model in (float16 for AWQ, _spec).
        processor = fam.processor if fam and chosen in PATCH_BACKENDS else None
        gpu_run = fam.gpu_run if fam else None
        return Route(model, arch, fam.name if fam else None, chosen, processor, quant, gpu_run, lists.version)

    if backend == "fake":
        return done("fake")
    if fam and fam.refusal:
        raise _refuse(model, what, fam.refusal, lists.version)
    vlm = lists.vlm(config) if lists.vlm else fam is not None
    if not vlm:
        why = "not a vision-language model lmdeploy serves"
        raise _refuse(model, what, why, lists.version)
    text = _arch(config.get("llm_config") or config.get("text_config") or {})
    turbomind = (
        arch in lists.turbomind
        and (arch not in _INTERNVL or text in lists.turbomind)
        and quantization.turbomind_reads(config)
    )
    if backend == "turbomind" and not turbomind:
        reason = arch
        if arch in _INTERNVL and text not in lists.turbomind:
            reason = f"its language model {text}"
        elif arch in lists.turbomind and quant:
            reason = f"{arch}, {quantization.name(quant)} quantisation"
        raise Refused(
            f"engine.backend: TurboMind does not support {model!r} ({reason}; lmdeploy {lists.version}); "
            "use --engine pytorch or auto"
        )
    chosen = backend if backend != "auto" else ("turbomind" if turbomind else "pytorch")
    if chosen == "pytorch":
        if arch in _get(lists.removed):
            raise _refuse(model, what, "lmdeploy removed it (REMOVED_MODEL_MAP)", lists.version)
        if arch not in _get(lists.pytorch):
            why = f"lmdeploy's PyTorch engine has no implementation of {arch}"
            raise _refuse(model, what, why, lists.version)
        if quant and quant.get("method") not in quantization.PYTORCH:
            why = f"neither engine reads its {quant.get('method')} quantisation"
            raise _refuse(model, what, why, lists.version)
    return done(chosen)


def _get(names):
    return names() if callable(names) else names


def read_files(model: str) -> tuple[dict, dict] | None:
    """config.json and preprocessor_config.json ({} when absent) of a local folder or any fsspec URI; None
    when config.json cannot be read here (a hub id on a driver without the files)."""
    from omnilmm_ray.storage import join, read_json, resolve

    try:
        fs, path = resolve(model)
        config = read_json(fs, join(path, "config.json"))
    except Exception:
        return None
    if not config:
        return None
    try:
        processor = read_json(fs, join(path, "preprocessor_config.json")) or {}
    except Exception:
        processor = {}
    return config, processor


def _spec(r: Route, config: dict, processor: dict):
    from omnilmm_ray.vision import PROCESSORS

    # TurboMind runs the model in its config's dtype (float16 for AWQ checkpoints), else bfloat16 here
    dtype = (
        "float16"
        if quantization.nested(config, "torch_dtype") == "float16" or config.get("dtype") == "float16"
        else "bfloat16"
    )
    return PROCESSORS[r.processor](r.arch, processor, dtype) if r.processor else None


def cpu_processor(model: str, backend: str = "auto"):
    """The vision.VisionSpec the CPU workers run for `model` on `backend` (the engine takes patches only
    when the backend an actor resolves is one of PATCH_BACKENDS), or None: the engine runs its own."""
    files = read_files(model)
    if files is None:
        return None
    try:
        r = route(files[0], model, backend)
    except Refused:  # the engine actor refuses it, with this reason, before any shard is read
        return None
    return _spec(r, *files)


def check(model: str, backend: str = "auto") -> dict:
    """`--dry-run`'s model check with this table (no lmdeploy needed); raises Refused."""
    files = read_files(model)
    if files is None:
        return {
            "model": model,
            "family": None,
            "note": "config.json is not readable here; the engine resolves it",
        }
    r = route(files[0], model, backend)
    return {
        **r.describe(),
        "processor_on_cpu_workers": _spec(r, *files) is not None,
        "checked_with": f"omnilmm-ray's table of lmdeploy {LMDEPLOY} (models.py)",
    }


def markdown_table() -> str:
    """README's Models table, generated from FAMILIES (tests/test_models.py compares them)."""
    rows = [
        "| family | backend (auto) | processor on CPU workers | run on GPU | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in FAMILIES:
        cpu = "yes" if f.processor else "no (engine)" if f.backend else "-"
        rows.append(f"| {f.name} | {f.backend or 'refused'} | {cpu} | {f.gpu_run or 'not run'} | {f.notes} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
