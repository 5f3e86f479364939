"""The data path's config sections, one per stage: `input` (readers), `preprocess` (CPU workers),
`engine` and `generation` (the GPU actors), `scale` (placement)."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from omnilmm_ray.config.base import DEFAULT_MODEL, SecretOptions, _refuse_credentials, _Strict


class InputConfig(_Strict):
    parquet_image_columns: list[str] = Field(
        ["jpg", "image", "png", "webp", "jpeg"],
        description="Binary columns tried, in order, as the image bytes of Parquet inputs.",
    )
    parquet_key_column: str = Field("key", description="Parquet column used as the sample key when present.")
    files_per_shard: int = Field(
        1000, gt=0, description="Loose image files are grouped into work units of this many files."
    )
    storage_options: SecretOptions = Field(
        default_factory=dict,
        repr=False,
        description="Extra fsspec storage options for the inputs (credentials and endpoint also come from "
        "the usual environment, e.g. AWS_ENDPOINT_URL).",
    )
    read_attempts: int = Field(
        3,
        ge=1,
        description="Reads of a shard (after the storage client's own retries) before it counts as unreadable.",
    )
    on_unreadable_shard: Literal["error_rows", "fail"] = Field(
        "error_rows",
        description="A shard that stays unreadable after retries becomes error rows, or fails the run.",
    )


class PreprocessConfig(_Strict):
    max_side: int = Field(448, gt=0, description="Images are resized so the long side is at most this.")
    max_pixels: int = Field(
        89_478_485, gt=0, description="Images with more pixels than this are refused (decompression bombs)."
    )
    jpeg_draft: bool = Field(
        True,
        description="Let libjpeg decode large JPEGs directly at 1/2, 1/4 or 1/8 scale (never below max_side).",
    )
    offload_processor: bool = Field(
        True,
        description="Run the model's own image processor on the CPU workers and hand the engine ready patches "
        "(Qwen2-VL family on TurboMind; the model folder must be readable by the driver). Other models, or "
        "false, hand the engine resized images and let it run its processor.",
    )
    batch_size: int = Field(32, gt=0, description="Rows per CPU preprocessing task call.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per preprocessing task.")


class EngineConfig(_Strict):
    backend: Literal["auto", "turbomind", "pytorch", "fake"] = Field(
        "auto",
        description="lmdeploy backend; 'auto' picks TurboMind when it supports the model, else PyTorch. "
        "'fake' is a deterministic CPU stand-in whose captions are placeholders.",
    )
    model: str = Field(
        DEFAULT_MODEL,
        description="The VLM: a Hugging Face id, a local folder (e.g. a shared volume on every node), or an "
        "object-store folder (s3://bucket/models/Qwen2-VL-2B-Instruct/) that each node downloads once into "
        "engine.cache_dir.",
    )
    cache_dir: str | None = Field(
        None,
        description="Local folder for models downloaded from object storage, one copy per node (default "
        "$OMNILMM_CACHE/models, else /tmp/omnilmm-ray/models). Needs room for the weights.",
    )
    tp: int = Field(1, ge=1, description="Tensor parallel degree: GPUs per engine actor.")
    session_len: int | None = Field(4096, gt=0, description="Max tokens per request (prompt+image+output).")
    cache_max_entry_count: float = Field(
        0.8, gt=0, le=1, description="Share of free GPU memory for KV cache."
    )
    max_batch_size: int | None = Field(None, gt=0, description="Engine's max concurrent requests.")
    quant_policy: Literal[0, 4, 8] = Field(0, description="KV cache quantisation: 0 (off), 4 or 8 bit.")
    trust_remote_code: bool = Field(False, description="Allow model repositories to run their own code.")
    chat_template: str | None = Field(None, description="lmdeploy chat template name to force.")
    vision_max_batch_size: int = Field(8, gt=0, description="lmdeploy VisionConfig.max_batch_size.")
    start_timeout_s: float = Field(
        900,
        gt=0,
        description="How long to wait for the first engine actor (a worker with `tp` free GPUs: an autoscaler may "
        "be adding one) to start before failing the job.",
    )
    max_crashes_per_image: int = Field(
        2,
        ge=1,
        description="An image becomes an `engine_crash` error row once engines died this many times with it "
        "alone in flight, within one attempt of the job (a kill of the whole job is no engine death). 2, not "
        "1: one death alone can be a coincidence (a GPU fault, an OOM from another process).",
    )
    fake_delay_s: float = Field(
        0.0, ge=0, description="Fake engine only: sleep per batch to emulate GPU time."
    )
    fake_decode_step_s: float = Field(
        0.0,
        ge=0,
        description="Fake engine only (pipeline benchmarks): take time as lmdeploy's pipeline over a "
        "continuous-batching engine does instead of per call: up to max_batch_size captions decode at once, "
        "admitted first come first served across calls, one token each per step of this many seconds; a call "
        "returns when its longest caption is done.",
    )
    fake_caption_tokens: tuple[int, int] = Field(
        (32, 32),
        description="Fake engine only, with fake_decode_step_s: each caption's length in tokens, drawn per "
        "image (from its pixels) out of this inclusive range.",
    )
    fake_crash_at_batch: int | None = Field(
        None,
        ge=1,
        description="Fake engine only (fault drills): the actor process dies on its Nth batch, once per job.",
    )
    fake_calls_log: str | None = Field(
        None,
        description="Fake engine only: append each batch's image count to this local file (work counting).",
    )
    fake_crash_on_size: tuple[int, int] | None = Field(
        None, description="Fake engine only (fault drills): the actor dies on every image of this (w, h)."
    )
    fake_refuse: str | None = Field(
        None,
        description="Fake engine only (drills): refuse the model with this reason, as lmdeploy refuses a model "
        "no backend serves.",
    )
    fake_blind: bool = Field(
        False,
        description="Fake engine only (drills): take images and ignore their pixels, as lmdeploy 0.18's "
        "PyTorch engine does with MiniCPM-V; the engine's image check (engines/sight.py) refuses it.",
    )
    fake_bad_captions: bool = Field(
        False,
        description="Fake engine only (quality drills): most images get a known-bad caption (repetition, "
        "refusal, empty, cut off, too short, other script), picked from the pixels; with the quality retry's "
        "generation settings all but refusals come back good.",
    )

    @field_validator("fake_caption_tokens")
    @classmethod
    def _a_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError("not a range of caption lengths: give [lo, hi] with 1 <= lo <= hi")
        return v

    @field_validator("model", "cache_dir")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        _refuse_credentials(
            v, "the job's settings, which Ray's logs show", "a credentials file the nodes read"
        )
        return v


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(96, gt=0, description="Caption length limit in tokens.")
    min_new_tokens: int | None = Field(
        None,
        ge=0,
        description="Generate at least this many tokens (benchmarks fix the output length with it).",
    )
    temperature: float = Field(0.0, ge=0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(1, ge=0)
    repetition_penalty: float = Field(1.05, gt=0)
    random_seed: int | None = Field(0, description="Seed for sampling; fixed for reproducible captions.")


class ScaleConfig(_Strict):
    batch_size: int = Field(
        256,
        gt=0,
        description="Images per engine call (fixed-size batches to the GPU). With concurrent_batches, the "
        "sequences the engine holds at once: 256 x 4 (1,024, what lmdeploy lets TurboMind decode at once on an "
        "H100 or H200) ran a 7B model 7.5 % faster than 256 x 2 and a 2B one within 2 % of the fastest cell "
        "measured (README, Tuning); lower it where that many do not fit the engine's KV cache.",
    )
    min_actors: int = Field(1, ge=1, description="Engine actors kept alive.")
    max_actors: int = Field(1, ge=1, description="Engine actors the pool may grow to.")
    max_batches_in_flight: int = Field(4, ge=1, description="Batches queued per engine actor.")
    concurrent_batches: int = Field(
        4,
        ge=1,
        description="Batches' worth of images in one actor's engine at once (batch_size x this), in calls on "
        "threads, so TurboMind's continuous batching starts the next batch while the previous one drains instead "
        "of running dry between batches. Short batches (Ray Data cuts one at the end of each bundle of blocks) "
        "run beside full ones within that budget. The PyTorch engine serialises calls anyway.",
    )
    actor_cpus: float = Field(
        2,
        gt=0,
        description="CPUs reserved per engine actor (a real engine; the fake one takes 0.5). It also sets the "
        "actor's thread count (OMP_NUM_THREADS), so several engines on one host do not oversubscribe its cores.",
    )
    shards_in_flight: int | None = Field(
        None,
        ge=1,
        description="Shards read at once (default 2 per engine actor, at least 4). Fewer shards in flight "
        "means less work redone after a crash (commits are per shard) and less driver memory.",
    )

    @model_validator(mode="after")
    def _pool(self) -> ScaleConfig:
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self
