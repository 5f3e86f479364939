"""One captioning run: preflight (started) -> lease -> plan -> preflight (awaited) -> pipeline -> verify -> seal.

Expects Ray to be initialised by the entrypoint (jobs/caption.py); library code never calls `ray.init`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter

from fsspec.implementations.local import LocalFileSystem

from omnilmm_ray.commit import (
    RunCounts,
    ShardCommitter,
    load_progress,
    remove_files,
    reopen_failed_shards,
    verify_run,
)
from omnilmm_ray.config import ConfigError, JobConfig
from omnilmm_ray.errors import as_config_error, storage_access
from omnilmm_ray.faults import clear_flight_records, kill_point
from omnilmm_ray.lease import Lease
from omnilmm_ray.redact import redact_text
from omnilmm_ray.reuse import build_index
from omnilmm_ray.schema import SHARD_KINDS
from omnilmm_ray.storage import join, read_json, write_bytes_atomic, write_json
from omnilmm_ray.table import OutputTable, Run

log = logging.getLogger(__name__)


class ErrorBudgetExceeded(RuntimeError):
    pass


def check_output(cfg: JobConfig, write: bool = True) -> OutputTable:
    """The output is reachable with our credentials and (`write`) accepts a write; else ConfigError."""
    table = OutputTable(cfg.output, cfg.sink.storage_options)
    probe = join(table.path, f"_probe-{uuid.uuid4().hex}")
    try:
        # a real write: on object stores only that proves the bucket exists and accepts our credentials
        if write:
            write_bytes_atomic(table.fs, probe, b"")
            table.fs.rm_file(probe)
        elif not table.run_ids() and not isinstance(table.fs, LocalFileSystem):
            table.fs.ls(table.path.split("/")[0])  # an empty listing: does the bucket exist at all?
    except Exception as e:
        raise as_config_error("output", cfg.output, e) or ConfigError(
            redact_text(f"output: {cfg.output} is not reachable or not writable ({type(e).__name__}: {e})")
        ) from None
    return table


def precheck(cfg: JobConfig) -> OutputTable:
    """What needs no Ray, so that the entrypoint fails in seconds: the output works and no job holds it."""
    table = check_output(cfg)
    with storage_access("output", cfg.output):
        Lease(cfg.output, cfg.sink.lock_ttl_s, cfg.sink.storage_options).check()
    return table


def start_preflight(cfg: JobConfig, wait_for_gpus: bool = True):
    """Start resolving the lmdeploy backend on a GPU worker; returns a function that waits for it.

    It runs while the inputs are listed and must succeed before any shard is read; a model no engine can
    serve fails the job there, naming the model. Missing GPUs are waited for (`engine.start_timeout_s`) only
    when `wait_for_gpus`: on a Ray the job started itself, none can ever join.
    """
    if cfg.engine.backend == "fake":
        return lambda: "fake"
    import ray

    from omnilmm_ray.pipeline import engine_resources

    @ray.remote(**engine_resources(cfg), max_retries=0)
    def _resolve(engine_cfg):
        from omnilmm_ray.engines.lmdeploy_engine import resolve_backend

        try:
            return resolve_backend(engine_cfg), None
        except ValueError as e:
            return None, str(e)

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < cfg.engine.tp and not wait_for_gpus:
        raise ConfigError(
            f"engine.backend: '{cfg.engine.backend}' needs {cfg.engine.tp} GPU(s) (engine.tp) and the "
            f"job's own local Ray has {gpus:.0f}; use --engine fake here, or run on a GPU machine or on a "
            "Ray cluster with GPU workers (RAY_ADDRESS / ray job submit)"
        )
    if gpus < cfg.engine.tp:
        log.warning(
            "the cluster has fewer than %d GPUs now; waiting up to %.0fs for one to join "
            "(engine.start_timeout_s; on a machine without GPUs use --engine fake)",
            cfg.engine.tp,
            cfg.engine.start_timeout_s,
        )
    ref = _resolve.remote(cfg.engine)
    result: list[str] = []

    def wait() -> str:
        if not result:
            try:
                backend, err = ray.get(ref, timeout=cfg.engine.start_timeout_s)
            except ray.exceptions.GetTimeoutError:
                ray.cancel(ref, force=True)
                raise ConfigError(
                    f"engine.tp: no worker with {cfg.engine.tp} free GPU(s) came up within "
                    f"{cfg.engine.start_timeout_s:.0f}s (engine.start_timeout_s); add GPU workers, lower "
                    "engine.tp, or use --engine fake on a machine without GPUs"
                ) from None
            if err:
                raise ConfigError(err)
            log.info("engine: %s -> lmdeploy %s backend", cfg.engine.model, backend)
            result.append(backend)
        return result[0]

    return wait


def processor_offload(cfg: JobConfig, backend: str):
    """The model's image processor to run on the CPU workers (vision.py), when this backend takes it."""
    if not cfg.preprocess.offload_processor or backend not in ("turbomind", "fake"):
        return None
    from omnilmm_ray.vision import load_spec

    spec = load_spec(cfg.engine.model)
    if spec is not None:
        log.info("preprocess: %s's image processor runs on the CPU workers (%s)", cfg.engine.model, spec.arch)
    return spec


def describe(cfg: JobConfig, run: Run) -> dict:
    from omnilmm_ray.pipeline import engine_resources

    by_format = Counter(s.format for s in run.shards)
    return {
        "run": run.run_id,
        "mode": "resume" if run.resumed else "new run",
        "shards": len(run.shards),
        "retried_shards": sum(1 for s in run.shards if s.retry),
        "by_format": dict(by_format),
        "input_bytes": sum(s.size for s in run.shards),
        "examples": [s.uri for s in run.shards[:5]],
        "engine": {"backend": cfg.engine.backend, "model": cfg.engine.model, "tp": cfg.engine.tp},
        "actors": {"min": cfg.scale.min_actors, "max": cfg.scale.max_actors, **engine_resources(cfg)},
        "batch_size": cfg.scale.batch_size,
        "output": cfg.output,
    }


def summarize(cfg: JobConfig, run: Run, counts: RunCounts, attempt: dict) -> dict:
    n = counts.rows
    errors = sum(counts.errors.values())
    return {
        "run": run.run_id,
        "status": "succeeded",
        "rows": n,
        "counts": {
            "ok": n - errors,
            "error": errors,
            "cached": counts.cached,
            "skipped_without_image": counts.skipped,
        },
        "error_rate": errors / n if n else 0.0,
        "failed_shards": sum(c for k, c in counts.errors.items() if k in SHARD_KINDS),
        "errors_by_kind": {
            k: {"count": c, "examples": counts.examples[k]} for k, c in counts.errors.most_common()
        },
        "tokens": {"input": counts.input_tokens, "output": counts.output_tokens},
        "shards": len(run.shards),
        "this_attempt": attempt,
        "config": cfg.model_dump(mode="json"),
    }


def run_job(
    cfg: JobConfig, dry_run: bool = False, table: OutputTable | None = None, wait_for_gpus: bool = True
) -> dict:
    """`table`: from `precheck`, when the entrypoint ran it; `wait_for_gpus`: see `start_preflight`."""
    if dry_run:
        table = check_output(cfg, write=False)
        with storage_access("inputs", cfg.inputs):  # the output answered: a storage error is the inputs'
            return {"dry_run": describe(cfg, table.open_run(cfg, write=False))}
    table = table or check_output(cfg)
    preflight = start_preflight(cfg, wait_for_gpus)
    with Lease(cfg.output, cfg.sink.lock_ttl_s, cfg.sink.storage_options) as lease:
        kill_point("lease")
        with storage_access("inputs", cfg.inputs):  # the output answered: a storage error is the inputs'
            run = table.open_run(cfg, before_write=preflight)
        backend = preflight()
        kill_point("plan")
        progress = load_progress(run.uri, cfg.sink.storage_options)
        remove_files(table.fs, progress.orphans)
        ended = read_json(table.fs, join(run.uri, "_summary.json")) if run.resumed else None
        failed_kinds = cfg.sink.retry_kinds() & SHARD_KINDS & set((ended or {}).get("errors_by_kind", {}))
        if failed_kinds:  # the run failed its error budget: read the shards that failed midway again
            reopen_failed_shards(run.uri, run.shards, failed_kinds, progress, cfg.sink.storage_options)
        todo = [s for s in run.shards if s.shard_id not in progress.complete]
        log.info(
            "run %s (%s): %d shards, %d already committed",
            run.run_id,
            "resumed" if run.resumed else "new",
            len(run.shards),
            len(run.shards) - len(todo),
        )
        reuse = table.reuse_index() if cfg.sink.reuse_captions else None
        committer = ShardCommitter(run.uri, todo, cfg.sink.storage_options, cfg.sink.commit_rows, progress)
        t0, processed = time.time(), 0
        if todo:
            from omnilmm_ray.pipeline import caption_batches

            vision = processor_offload(cfg, backend)
            batches = caption_batches(todo, cfg, run.uri, reuse, progress.done_indices, vision)
            try:
                for batch in batches:
                    processed += sum(1 for e in batch.column("shard_rows").to_pylist() if e is None)
                    lease.ensure()  # `add` may write a part or a shard file
                    committer.add(batch)
            finally:
                # Shut Ray Data's executor and its engine actors down now, on an error too, instead of
                # whenever the iterator is garbage-collected; then drop this attempt's flight records.
                batches.close()
                clear_flight_records()
        if committer.uncommitted():
            raise RuntimeError(
                f"pipeline ended with shards not fully captioned: {committer.uncommitted()[:5]}"
            )
        wall = time.time() - t0
        kill_point("verify")
        counts = verify_run(run.uri, run.shards, cfg.sink.storage_options)
        attempt = {
            "resumed": run.resumed,
            "shards_committed_before": len(run.shards) - len(todo),
            "rows_in_parts_before": sum(len(v) for v in progress.done_indices.values()),
            "shards_processed": len(todo),
            "rows_processed": processed,
            "duplicates_dropped": committer.duplicates_dropped,
            "wall_s": round(wall, 3),
            "images_per_s": round(processed / wall, 3) if wall > 0 else None,
            "backend": backend,
        }
        summary = summarize(cfg, run, counts, attempt)
        over = (
            summary["error_rate"] > cfg.sink.max_error_rate
            or summary["failed_shards"] > cfg.sink.max_failed_shards
        )
        if over:
            summary["status"] = "failed: error budget exceeded"
        fs, path = table.fs, join(table.path, f"run={run.run_id}")
        lease.ensure()
        write_json(fs, join(path, "_summary.json"), summary)
        kill_point("seal")
        if over:
            raise ErrorBudgetExceeded(
                f"{summary['error_rate']:.1%} of rows are errors (sink.max_error_rate={cfg.sink.max_error_rate}), "
                f"{summary['failed_shards']} shard(s) could not be read to their end (sink.max_failed_shards="
                f"{cfg.sink.max_failed_shards}); rows are committed in {run.uri} but the run is not sealed: rerun "
                "to read failed shards again, or raise the budget to seal it as it is; top errors: "
                f"{dict(list(summary['errors_by_kind'].items())[:3])}"
            )
        lease.ensure()
        # Before the seal: a crash up to here leaves the run unsealed, and its resumption writes the index.
        build_index(run.uri, [s.shard_id for s in run.shards], counts.rows, cfg.sink.storage_options)
        write_bytes_atomic(fs, join(path, "_SUCCESS"), b"")
        return summary
