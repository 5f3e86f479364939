"""The data path, in one screen: shards -> read -> decode/resize (CPU) -> caption (GPU actors) -> driver.

The only module that imports `ray.data`. Output rows stream back to the driver, where the committer
(commit.py) writes them shard by shard.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator

import pyarrow as pa
import ray
import ray.data
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from omnilmm_ray.config import JobConfig
from omnilmm_ray.reuse import ReuseIndex, apply_reuse
from omnilmm_ray.sources import Shard
from omnilmm_ray.stages import CaptionStage, preprocess_stage, read_shards

# Reading is I/O-bound; a fractional CPU lets several shards stream while decoding keeps the cores
# busy. Different resources also keep Ray Data from fusing reading and decoding into one task.
READ_CPUS = 0.25
MAX_INPUT_BLOCKS = 10_000


def engine_resources(cfg: JobConfig) -> dict:
    """Placement of one engine actor: `tp` GPUs for a real engine, half a CPU for the fake one.

    Ray Data fuses a task stage into the next actor stage when their resources are equal, which would
    move decoding into the engine actor; the fake actor's half CPU keeps them apart (GPUs do for real ones).
    """
    if cfg.engine.backend == "fake":
        return {"num_cpus": 0.5, "num_gpus": 0}
    return {"num_cpus": cfg.scale.actor_cpus, "num_gpus": cfg.engine.tp}


def initial_actors(cfg: JobConfig) -> int:
    """Engine actors to start with: as many as the GPUs free now hold (within min/max_actors).

    Ray Data's autoscaler adds an actor only once the running ones are saturated, and an engine takes
    ~20 s to start, so a pool that starts at `min_actors` on a host whose GPUs are all free spends that
    long at a fraction of its speed; GPUs that join later (a cluster autoscaler) are still scaled up to.
    """
    if cfg.engine.backend == "fake" or not ray.is_initialized():
        return cfg.scale.min_actors
    free = int(ray.available_resources().get("GPU", 0) // cfg.engine.tp)
    return max(cfg.scale.min_actors, min(cfg.scale.max_actors, free))


def shards_in_flight(cfg: JobConfig) -> int:
    return cfg.scale.shards_in_flight or max(4, 2 * cfg.scale.max_actors)


def build_dataset(
    shards: list[Shard],
    cfg: JobConfig,
    run_uri: str,
    reuse: ReuseIndex | None,
    skip: dict[str, set[int]] | None = None,
    vision=None,
    gate_key: str | None = None,
) -> ray.data.Dataset:
    """`reuse`: the index of earlier runs' captions, looked up after decoding (None: nothing to reuse).
    `skip`: per shard, sample indices already committed in part files (not read into the pipeline).
    `vision`: the model's image processor to run on the CPU workers (vision.py), or None."""
    skip = skip or {}
    items = [
        {"shard": json.dumps(s.to_dict()), "skip": json.dumps(sorted(skip.get(s.shard_id, ())))}
        for s in shards
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), MAX_INPUT_BLOCKS)))
    # Ray Data coalesces a task's outputs into blocks of up to `target_max_block_size` (128 MiB by default),
    # so captions would reach the driver (and be committed) many batches at a time. Blocks of about half an
    # engine batch of pixels make each engine task about one batch, and captions stream back per batch.
    # `ds.context` is this dataset's own copy of the DataContext, not the process-wide one.
    # Patches from the model's processor (vision.py) are bfloat16 with the frame repeated: 12 bytes per pixel.
    # Reads are launched at once, beside the engine actors' start (Ray Data's default: no
    # `wait_for_min_actors_s`), and wait at the gate (gate.py) until the first actor has resolved the model's
    # backend: shards are then read and decoded while TurboMind builds, and the first batch is ready when the
    # engine is. The gate's wait is also what turns an actor that cannot be placed in time into a clear error.
    # Keep an engine actor until the inputs run out: Ray Data's autoscaler would release one whose
    # utilisation dips (seen right after start, while the first blocks are still being read), and starting
    # an engine again costs ~15 s of a GPU. Scaling up, and down once everything is read, are unchanged.
    ds.context.autoscaling_config = dataclasses.replace(
        ds.context.autoscaling_config, actor_pool_util_downscaling_threshold=-1.0
    )
    bytes_per_pixel = 12 if vision is not None else 3
    ds.context.target_max_block_size = max(
        1 << 20, cfg.scale.batch_size * cfg.preprocess.max_side**2 * bytes_per_pixel // 2
    )
    ds = ds.map_batches(
        read_shards,
        fn_kwargs={"cfg": cfg, "gate_key": gate_key},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=READ_CPUS,
        compute=TaskPoolStrategy(size=min(shards_in_flight(cfg), max(1, len(items)))),
    )
    ds = ds.map_batches(
        preprocess_stage,
        fn_kwargs={"cfg": cfg.preprocess, "vision": vision, "gate_key": gate_key},
        batch_size=cfg.preprocess.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.preprocess.num_cpus,
    )
    if reuse is not None:
        # Same resources and batch size as preprocessing, so Ray Data fuses the two into one task. The
        # index is a list of URIs; each task reads only the index row groups its batch's hashes fall in.
        # The prompts are rendered there for the lookup, and again, the same, in the engine stage.
        ds = ds.map_batches(
            apply_reuse,
            fn_kwargs={"index": reuse, "prompt": cfg.prompt, "prompts": cfg.prompts},
            batch_size=cfg.preprocess.batch_size,
            batch_format="pyarrow",
            num_cpus=cfg.preprocess.num_cpus,
        )
    ds = ds.map_batches(
        CaptionStage,
        # Small arguments only. Ray still logs "constructor arguments in the object store and max_restarts
        # > 0" for every actor pool: Ray Data puts each map UDF in the object store itself and holds that
        # reference for the dataset's life, so restarts keep working (ray-project/ray#53727, #57838).
        fn_constructor_kwargs={"cfg": cfg, "run_uri": run_uri, "vision": vision, "gate_key": gate_key},
        **engine_placement(cfg),
    )
    return ds


def engine_placement(cfg: JobConfig) -> dict:
    """`map_batches` arguments of the engine actor pool: fixed-size batches, pool size, resources."""
    return dict(
        batch_size=cfg.scale.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(
            min_size=cfg.scale.min_actors,
            max_size=cfg.scale.max_actors,
            initial_size=initial_actors(cfg),
            # Twice the calls the image budget holds in full batches: short batches (the end of a bundle of
            # blocks) run beside full ones while stages.EngineSlots keeps the engine's images within budget.
            max_tasks_in_flight_per_actor=max(
                cfg.scale.max_batches_in_flight, 2 * cfg.scale.concurrent_batches
            ),
            max_concurrent_calls_per_actor=2 * cfg.scale.concurrent_batches,
            enable_true_multi_threading=True,
        ),
        # An actor whose engine died exits; Ray Data's actor pools default to max_restarts=-1 and
        # max_task_retries=-1, so the actor is replaced and its batches are retried.
        **engine_resources(cfg),
    )


def build_caption_stage(
    cfg: dict | JobConfig, image_column: str = "image"
) -> Callable[[ray.data.Dataset], ray.data.Dataset]:
    """A stage for your own Ray Data pipeline, in the style of ray.data.llm's processors:
    `ds = build_caption_stage({"engine": {"backend": "turbomind"}})(ds)`.

    `cfg`: the job's config fields (no inputs or output). The dataset has an `image_column` of image bytes,
    paths / URIs (read with `input.storage_options`) or Hugging Face `{bytes, path}` structs; other columns
    pass through, and templates see them as `{metadata.NAME}` (`{text}`, `{key}`: those columns). Output:
    your columns, then the caption columns of the job's output table (one row per input row; a bad image
    is an error row). The returned function only adds stages: nothing runs until the dataset is consumed.
    """
    from omnilmm_ray.user_stage import UserCaptionStage, preprocess_keeping_user, stage_config, to_samples

    cfg = stage_config(cfg)

    def stage(ds: ray.data.Dataset) -> ray.data.Dataset:
        ds = ds.map_batches(
            to_samples,
            fn_kwargs={"cfg": cfg, "image_column": image_column},
            batch_size=cfg.preprocess.batch_size,
            batch_format="pyarrow",
            num_cpus=READ_CPUS,
        )
        ds = ds.map_batches(
            preprocess_keeping_user,
            fn_kwargs={"cfg": cfg},
            batch_size=cfg.preprocess.batch_size,
            batch_format="pyarrow",
            num_cpus=cfg.preprocess.num_cpus,
        )
        return ds.map_batches(UserCaptionStage, fn_constructor_kwargs={"cfg": cfg}, **engine_placement(cfg))

    return stage


def caption_batches(
    shards: list[Shard],
    cfg: JobConfig,
    run_uri: str,
    reuse: ReuseIndex | None,
    skip: dict[str, set[int]] | None = None,
    vision=None,
    gate_key: str | None = None,
) -> Iterator[pa.Table]:
    ds = build_dataset(shards, cfg, run_uri, reuse, skip, vision, gate_key)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
