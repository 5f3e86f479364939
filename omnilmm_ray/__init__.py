"""omnilmm-ray: caption huge image collections with vision-language models on Ray + lmdeploy.

Importing the package imports neither Ray Data's engine stack, torch nor lmdeploy.
"""

__version__ = "0.1.0"

__all__ = ["build_caption_stage", "caption"]


def __getattr__(name: str):
    # Lazy, so that `import omnilmm_ray` stays light: the API imports Ray when first used.
    if name == "caption":
        from omnilmm_ray.api import caption

        return caption
    if name == "build_caption_stage":
        from omnilmm_ray.pipeline import build_caption_stage

        return build_caption_stage
    raise AttributeError(f"module 'omnilmm_ray' has no attribute {name!r}")
