"""LmdeployEngine: lmdeploy's `pipeline` (TurboMind or PyTorch backend) behind the Engine interface.

Imported only inside GPU actors (and the preflight task of a run with nothing to caption).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings

from PIL import Image

from omnilmm_ray import models
from omnilmm_ray.config import EngineConfig, GenerationConfig
from omnilmm_ray.engines.base import Caption, EngineDied, Prepared, per_image
from omnilmm_ray.engines.sight import check_sight
from omnilmm_ray.weights import local_model

log = logging.getLogger(__name__)


def lmdeploy_lists():
    """models.Lists from the lmdeploy installed here (models.OWN mirrors 0.18.0's; tests/gpu compares)."""
    import lmdeploy
    from lmdeploy.archs import check_vl_llm
    from lmdeploy.turbomind.supported_models import SUPPORTED_ARCHS

    def pytorch_module_map():
        # Imported only when needed: it pulls in the PyTorch engine's modules, which a TurboMind job's gate
        # would wait for.
        from lmdeploy.pytorch.models.module_map import MODULE_MAP, REMOVED_MODEL_MAP

        return frozenset(MODULE_MAP), frozenset(REMOVED_MODEL_MAP)

    return models.Lists(
        turbomind=frozenset(SUPPORTED_ARCHS),
        pytorch=lambda: pytorch_module_map()[0],
        removed=lambda: pytorch_module_map()[1],
        version=lmdeploy.__version__,
        vlm=lambda config: check_vl_llm("turbomind", config),
    )


def resolve(cfg: EngineConfig) -> models.Route:
    """How lmdeploy serves `cfg.model` (models.route with lmdeploy's own lists); raises ValueError naming
    the model when no engine captions it from the image.

    Reads only the model's config, so it runs before any shard is read; a model in object storage is
    downloaded to this node's cache first, so the engine actor that starts here next finds it there.
    """
    t0 = time.monotonic()
    from lmdeploy.archs import get_model_arch

    lists = lmdeploy_lists()
    log.info("lmdeploy imported in %.1fs", time.monotonic() - t0)  # most of an engine actor's start

    path = local_model(cfg.model, cfg.cache_dir)
    files = models.read_files(path)
    if files and (family := models.family_of(files[0])) and family.refusal:
        # refused whatever lmdeploy reads (MiniCPM-V's config is remote code it loads only when trusted)
        models.route(files[0], cfg.model, cfg.backend, lists)
    try:
        arch, hf_cfg = get_model_arch(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise ValueError(
            f"engine.model: cannot load the config of {cfg.model!r} ({type(e).__name__}: {e}); "
            "give a local model folder or a Hugging Face id reachable from the GPU workers"
        ) from None
    # lmdeploy's own config object: sub-configs as dicts, and `architectures` as get_model_arch found it
    config = {**hf_cfg.to_dict(), "architectures": [arch]}
    route = models.route(config, cfg.model, cfg.backend, lists)
    if cfg.backend == "auto" and route.backend == "pytorch":
        log.warning(
            "engine: TurboMind does not support %s (%s); routing to lmdeploy's PyTorch engine",
            cfg.model,
            arch,
        )
    return route


def resolve_backend(cfg: EngineConfig) -> str:
    return resolve(cfg).backend


class LmdeployEngine:
    def __init__(self, cfg: EngineConfig, gen: GenerationConfig, backend: str | None = None):
        import lmdeploy

        self.backend = backend or resolve_backend(cfg)
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
            local_model(cfg.model, cfg.cache_dir),
            backend_config=backend_config,
            chat_template_config=lmdeploy.ChatTemplateConfig(cfg.chat_template)
            if cfg.chat_template
            else None,
            vision_config=lmdeploy.VisionConfig(max_batch_size=cfg.vision_max_batch_size),
            trust_remote_code=cfg.trust_remote_code,
            log_level="WARNING",
        )
        self.gen_config = _gen_config(gen)
        # the sequences the engine decodes at once: lmdeploy resolves an unset max_batch_size by GPU
        self.max_sequences = self.pipe.backend_config.max_batch_size
        self.tokenizer = self.pipe.async_engine.tokenizer
        self.takes_prepared = self.backend == "turbomind" and _accept_prepared(self.pipe)
        self.redecoded = 0  # captions recovered by the workaround in _text
        self.serial_calls = self.backend == "pytorch"  # its calls take turns (caption)
        self._lock = threading.Lock() if self.serial_calls else contextlib.nullcontext()
        _pil_image_processor(self.pipe)
        try:
            self.sight = check_sight(
                self, cfg.model, f"lmdeploy {lmdeploy.__version__}'s {self.backend} engine"
            )
        except Exception:
            self.pipe.close()  # this process may live on (a test, the Python API): give the GPU memory back
            raise
        log.info("engine ready: %s %s tp=%d; sees images: %s", self.name, cfg.model, cfg.tp, self.sight)

    def _text(self, r) -> str:
        # lmdeploy's incremental detokenizer returns '' when the decoded text ends in U+FFFD (a caption cut
        # mid-character by max_new_tokens); the tokens are there, so decode them in one go.
        if not r.text and r.token_ids:
            self.redecoded += 1
            return self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        return r.text

    def caption(
        self,
        prompts: str | list[str],
        images: list[Image.Image | Prepared | None],
        gen: GenerationConfig | None = None,
    ) -> list[Caption]:
        # Several threads may call this (scale.concurrent_batches): TurboMind's Pipeline.infer hands requests to
        # the engine's event-loop thread, which batches concurrent calls together (run on GPU in tests/gpu).
        # The PyTorch engine is not declared thread-safe unless configured so; its calls take turns.
        if any(isinstance(im, Prepared) for im in images) and not self.takes_prepared:
            raise ValueError(f"{self.name} cannot take pre-processed images for this model")
        # OpenAI-style messages: lmdeploy passes an `image_data` item's object through to the processor
        # untouched, where the hook installed by _accept_prepared picks up a Prepared one.
        requests = [
            [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": prompt}]
                    + ([] if im is None else [{"type": "image_data", "image_data": {"data": im}}]),
                }
            ]
            for prompt, im in zip(per_image(prompts, len(images)), images)
        ]
        gen_config = self.gen_config if gen is None else _gen_config(gen)
        try:
            with self._lock:
                responses = self.pipe(requests, gen_config=gen_config)
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


def _gen_config(gen: GenerationConfig):
    import lmdeploy

    return lmdeploy.GenerationConfig(
        max_new_tokens=gen.max_new_tokens,
        min_new_tokens=gen.min_new_tokens,
        do_sample=gen.temperature > 0,
        temperature=gen.temperature or 1.0,
        top_p=gen.top_p,
        top_k=gen.top_k,
        repetition_penalty=gen.repetition_penalty,
        random_seed=gen.random_seed,
    )


def _accept_prepared(pipe) -> bool:
    """Let TurboMind's Qwen2-VL processor step take `Prepared` patches as they are; False for other models.

    lmdeploy 0.18 runs `VisionModel.preprocess(messages)` on one executor thread per engine and, for
    TurboMind's native Qwen2 ViT, hashes the float32 patches again on the event-loop thread when no
    `fingerprint` is given (turbomind/models/qwen2_vl.py `_resolve_fingerprint`). A Prepared item arrives
    as patches in the model's dtype (TurboMind converts any other, turbomind/models/vision_utils.py
    `to_tm_tensor`) with a fingerprint, so both steps cost nothing; anything else goes to the model's
    own processor. The output dict has the keys lmdeploy's Qwen2VLModel.preprocess produces.
    """
    import torch

    encoder = getattr(pipe.async_engine, "vl_encoder", None)
    vm = getattr(encoder, "model", None)
    if type(vm).__name__ != "Qwen2VLModel" or getattr(encoder, "_uses_new_preprocess", True):
        return False
    original = vm.preprocess
    merge = vm.processor.image_processor.merge_size
    patch_dim = (
        3 * vm.processor.image_processor.temporal_patch_size * vm.processor.image_processor.patch_size**2
    )
    patch = vm.processor.image_processor.patch_size

    def preprocess(messages: list[dict]) -> list[dict]:
        items = vm.collect_multimodal_items(messages)
        if not items or not all(isinstance(data, Prepared) for _, data, _ in items):
            return original(messages)
        outputs = []
        for _, p, _ in items:
            w, h = p.size
            with warnings.catch_warnings():  # read-only buffer: lmdeploy only reads it
                warnings.simplefilter("ignore", UserWarning)
                pixels = torch.frombuffer(p.pixels, dtype=getattr(torch, p.dtype)).view(-1, patch_dim)
            grid = torch.tensor([[1, h // patch, w // patch]])
            outputs.append(
                dict(
                    pixel_values=pixels,
                    image_grid_thw=grid,
                    image_size=p.size,
                    image_tokens=grid.prod(dim=1) // merge**2,
                    image_token_id=vm.image_token_id,
                    fingerprint=p.fingerprint,
                )
            )
        messages.append(dict(role="preprocess", content=outputs))
        return messages

    vm.preprocess = preprocess
    return True


def _pil_image_processor(pipe) -> None:
    """Give lmdeploy's LLaVA-hf preprocessing an image processor that reads what it is handed.

    lmdeploy 0.18 calls the model's image processor with a PIL image and `input_data_format='channels_last'`
    (vl/model/llava_hf.py and llava_next.py `preprocess`). transformers 5 picks the torchvision backend of an image processor
    where torchvision is installed, which takes that argument as the layout of the tensor it makes from the
    image (channels first) and fails every request ("The size of tensor a (224) must match the size of tensor
    b (3)"; the image check refuses the model). The PIL backend of the same processor reads the image as
    channels last, as lmdeploy says: load that one, with the model's own settings.
    """
    import transformers

    vm = getattr(getattr(pipe.async_engine, "vl_encoder", None), "model", None)
    if type(vm).__name__ not in (
        "LlavaHfVisionModel",
        "LlavaNextVisionModel",
    ):  # llava_next.py: the same call
        return
    name = type(vm.processor).__name__
    pil = getattr(transformers, name if name.endswith("Pil") else name + "Pil", None)
    if pil is not None and not isinstance(vm.processor, pil):
        vm.processor = pil.from_pretrained(vm.model_path)
        log.info("engine: %s's image processor runs on its PIL backend (%s)", vm.model_path, pil.__name__)
