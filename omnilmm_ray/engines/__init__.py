"""The engine interface: a batch of (prompt, image) pairs in, one Caption per pair out.

`prompts` is one prompt for every image, or one per image (multi-prompt mode repeats an image once per
prompt, and templates render a prompt per sample); an image None asks with the text alone (sight.py).
`gen` replaces the engine's generation settings for this call (the quality retry); None keeps the ones it
was built with. Every engine checks when it is built that it captions from the image (sight.py).

Backends are imported lazily so the driver and CPU workers never import lmdeploy or torch.
"""

from __future__ import annotations

from omnilmm_ray.config import EngineConfig, GenerationConfig
from omnilmm_ray.engines.base import Caption, Engine, EngineDied, Prepared, per_image  # noqa: F401
from omnilmm_ray.models import Route


def resolve(cfg: EngineConfig) -> Route:
    """How `cfg.model` is served (models.Route: backend, family, ...); raises ValueError naming the field
    when no engine captions it from the image.

    Reads only the model's config, no weights: cheap once the backend's package is imported."""
    if cfg.backend == "fake":
        if cfg.fake_refuse:
            raise ValueError(f"engine.model: {cfg.model!r}: {cfg.fake_refuse}")
        return Route(cfg.model, "", None, "fake", None, None, None, "fake")
    from omnilmm_ray.engines.lmdeploy_engine import resolve as resolve_lmdeploy

    return resolve_lmdeploy(cfg)


def resolve_backend(cfg: EngineConfig) -> str:
    return resolve(cfg).backend


def make_engine(
    cfg: EngineConfig, gen: GenerationConfig, crash_marker: str | None = None, backend: str | None = None
) -> Engine:
    """`backend`: from `resolve_backend`, when the caller resolved it already."""
    if cfg.backend == "fake":
        from omnilmm_ray.engines.fake import FakeEngine

        return FakeEngine(cfg, crash_marker)
    from omnilmm_ray.engines.lmdeploy_engine import LmdeployEngine

    return LmdeployEngine(cfg, gen, backend)
