"""LmdeployEngine: lmdeploy's `pipeline` (TurboMind or PyTorch backend) behind the Engine interface.

Imported only inside GPU actors and the GPU preflight task.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from PIL import Image

from omnilmm_ray.config import EngineConfig, GenerationConfig
from omnilmm_ray.engines import Caption, EngineDied

log = logging.getLogger(__name__)


def resolve_backend(cfg: EngineConfig) -> str:
    """Which lmdeploy backend serves `cfg.model`; raises ValueError naming the model when none can.

    Reads only the model's config (no weights), so it runs before any shard is read.
    """
    from lmdeploy.archs import check_vl_llm, get_model_arch
    from lmdeploy.pytorch.models.module_map import MODULE_MAP
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS, is_supported

    try:
        arch, hf_cfg = get_model_arch(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise ValueError(
            f"engine.model: cannot load the config of {cfg.model!r} ({type(e).__name__}: {e}); "
            "give a local model folder or a Hugging Face id reachable from the GPU workers"
        ) from None
    if not check_vl_llm("turbomind", hf_cfg.to_dict()):
        raise ValueError(
            f"engine.model: {cfg.model!r} ({arch}) is not a vision-language model lmdeploy can "
            "serve; pick one from lmdeploy's supported VLM list"
        )
    turbomind_ok = is_supported(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.backend == "turbomind" and not turbomind_ok:
        raise ValueError(
            f"engine.backend: TurboMind does not support {cfg.model!r} ({arch}; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHS))}); use --engine pytorch or auto"
        )
    backend = cfg.backend if cfg.backend != "auto" else ("turbomind" if turbomind_ok else "pytorch")
    if backend == "pytorch" and arch not in MODULE_MAP:
        raise ValueError(
            f"engine.model: lmdeploy's PyTorch engine has no implementation of {arch} "
            f"({cfg.model!r}); pick a supported model"
        )
    if cfg.backend == "auto" and backend == "pytorch":
        log.warning(
            "engine: TurboMind does not support %s (%s); routing to lmdeploy's PyTorch engine",
            cfg.model,
            arch,
        )
    return backend


class LmdeployEngine:
    def __init__(self, cfg: EngineConfig, gen: GenerationConfig):
        import lmdeploy

        self.backend = resolve_backend(cfg)
        self.name = f"lmdeploy-{self.backend}"
        common = dict(
            session_len=cfg.session_len,
            tp=cfg.tp,
            cache_max_entry_count=cfg.cache_max_entry_count,
            quant_policy=cfg.quant_policy,
        )
        if cfg.max_batch_size:
            common["max_batch_size"] = cfg.max_batch_size
        if self.backend == "turbomind":
            # tp > 1: NCCL, never TurboMind's cuda-ipc communicator (it creates NVLink multicast objects).
            backend_config = lmdeploy.TurbomindEngineConfig(**common, communicator="nccl")
        else:
            backend_config = lmdeploy.PytorchEngineConfig(**common)
        self.pipe = lmdeploy.pipeline(
            cfg.model,
            backend_config=backend_config,
            chat_template_config=lmdeploy.ChatTemplateConfig(cfg.chat_template)
            if cfg.chat_template
            else None,
            vision_config=lmdeploy.VisionConfig(max_batch_size=cfg.vision_max_batch_size),
            trust_remote_code=cfg.trust_remote_code,
            log_level="WARNING",
        )
        self.gen_config = lmdeploy.GenerationConfig(
            max_new_tokens=gen.max_new_tokens,
            do_sample=gen.temperature > 0,
            temperature=gen.temperature or 1.0,
            top_p=gen.top_p,
            top_k=gen.top_k,
            repetition_penalty=gen.repetition_penalty,
            random_seed=gen.random_seed,
        )
        self.tokenizer = self.pipe.async_engine.tokenizer
        self.redecoded = 0  # captions recovered by the workaround in _text
        self._lock = threading.Lock() if self.backend == "pytorch" else contextlib.nullcontext()
        log.info("engine ready: %s %s tp=%d", self.name, cfg.model, cfg.tp)

    def _text(self, r) -> str:
        # lmdeploy's incremental detokenizer returns '' when the decoded text ends in U+FFFD (a caption cut
        # mid-character by max_new_tokens); the tokens are there, so decode them in one go.
        if not r.text and r.token_ids:
            self.redecoded += 1
            return self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        return r.text

    def caption(self, prompt: str, images: list[Image.Image]) -> list[Caption]:
        # Several threads may call this (scale.concurrent_batches): TurboMind's Pipeline.infer hands requests to
        # the engine's event-loop thread, which batches concurrent calls together (run on GPU in tests/gpu).
        # The PyTorch engine is not declared thread-safe unless configured so; its calls take turns.
        try:
            with self._lock:
                responses = self.pipe([(prompt, im) for im in images], gen_config=self.gen_config)
        except Exception as e:  # the batch call itself failed: the engine's state is unknown
            raise EngineDied(f"{self.name} failed a batch call: {type(e).__name__}: {e}") from e
        out = []
        for r in responses:
            if r.finish_reason in ("error", "abort"):
                out.append(
                    Caption(
                        None,
                        r.input_token_len,
                        r.generate_token_len,
                        r.finish_reason,
                        error=f"engine finished with {r.finish_reason!r}",
                    )
                )
            else:
                out.append(Caption(self._text(r), r.input_token_len, r.generate_token_len, r.finish_reason))
        return out
