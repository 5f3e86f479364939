"""One captioning run: lease -> plan -> pipeline (plan written once an engine serves the model) -> verify -> seal.

Expects Ray to be initialised by the entrypoint (jobs/caption.py); library code never calls `ray.init`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
import uuid
from collections import Counter

from fsspec.implementations.local import LocalFileSystem

from omnilmm_ray import gate
from omnilmm_ray.commit import (
    WRITERS,
    RunCounts,
    ShardCommitter,
    load_progress,
    remove_files,
    reopen_failed_shards,
    verify_run,
)
from omnilmm_ray.config import ConfigError, JobConfig
from omnilmm_ray.engines import resolve_backend
from omnilmm_ray.errors import as_config_error, storage_access
from omnilmm_ray.faults import clear_flight_records, kill_point
from omnilmm_ray.gate import EngineNotStarted
from omnilmm_ray.lease import Lease
from omnilmm_ray.metrics import DriverMetrics
from omnilmm_ray.progress import ProgressReporter, plan_counts
from omnilmm_ray.prompts import TypoCheck, templates
from omnilmm_ray.quality import quality_summary
from omnilmm_ray.redact import redact_text
from omnilmm_ray.reuse import build_index
from omnilmm_ray.schema import SHARD_KINDS, output_schema
from omnilmm_ray.snapshot import publish
from omnilmm_ray.storage import join, read_json, write_bytes_atomic, write_json
from omnilmm_ray.table import PROBE, OutputTable, Run

log = logging.getLogger(__name__)


class ErrorBudgetExceeded(RuntimeError):
    pass


def check_output(cfg: JobConfig, write: bool = True) -> OutputTable:
    """The output is reachable with our credentials and (`write`) accepts a write; else ConfigError."""
    table = OutputTable(cfg.output, cfg.sink.storage_options)
    probe = join(table.path, f"{PROBE}{uuid.uuid4().hex}")
    try:
        # a real write: on object stores only that proves the bucket exists and accepts our credentials
        if write:
            if isinstance(table.fs, LocalFileSystem):
                os.makedirs(table.path, exist_ok=True)
            # A plain write, not an atomic one: the lease holder may remove a probe at any time (one a kill
            # left, OutputTable.remove_leftovers), and a temporary file renamed away would fail this check.
            table.fs.pipe_file(probe, b"")
            with contextlib.suppress(FileNotFoundError):
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


def attached_to_cluster() -> bool:
    """Whether ray.init joined a cluster that existed before this job (RAY_ADDRESS, `ray job submit`, a
    `ray start` on this host), which may gain GPU workers; a Ray this process started itself never will."""
    import ray

    # No public API tells whether ray.init started the head node; when in doubt, assume a cluster (wait).
    node = getattr(ray._private.worker, "_global_node", None)
    return not getattr(node, "head", False)


def require_gpus(cfg: JobConfig, wait_for_gpus: bool = True) -> None:
    """Fail at once when no GPU can ever come (a Ray the job started itself, without GPUs); otherwise say
    that the job waits for one (`engine.start_timeout_s`)."""
    if cfg.engine.backend == "fake":
        return
    import ray

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


def preflight(cfg: JobConfig) -> str:
    """Resolve the backend in a GPU task, for a new run with nothing to caption: no engine actor starts
    to do it (gate.py), yet a run must not be sealed with settings no engine serves."""
    if cfg.engine.backend == "fake":
        try:
            return resolve_backend(cfg.engine)
        except ValueError as e:  # the fake's refusal drill: the same exit 2 as a real engine's refusal
            raise ConfigError(str(e)) from None
    import ray

    from omnilmm_ray.pipeline import engine_resources

    @ray.remote(**engine_resources(cfg), max_retries=0)
    def _resolve(engine_cfg):
        try:
            return resolve_backend(engine_cfg), None
        except ValueError as e:
            return None, str(e)

    ref = _resolve.remote(cfg.engine)
    try:
        backend, err = ray.get(ref, timeout=cfg.engine.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise ConfigError(str(EngineNotStarted(cfg.engine.start_timeout_s))) from None
    if err:
        raise ConfigError(err)
    return backend


def _engine_refused(cfg: JobConfig, key: str, e: BaseException | None) -> str | None:
    """Why the pipeline failed, when it was the gate (gate.py): a model no engine serves, or no engine
    actor started in time."""
    state = gate.peek(key)
    if state and "error" in state:
        return state["error"]
    while e is not None and state is None:  # Ray Data wraps a task's exception in its own
        text = f"{type(e).__name__}: {e}"
        # a read task that waited at the gate for longer than engine.start_timeout_s
        if EngineNotStarted.__name__ in text:
            return str(EngineNotStarted(cfg.engine.start_timeout_s))
        e = e.__cause__ or e.__context__
    return None


def processor_offload(cfg: JobConfig):
    """The model's image processor to run on the CPU workers (models.cpu_processor), or None; an engine
    actor takes the patches only when the backend it resolves is one of models.PATCH_BACKENDS."""
    if not cfg.preprocess.offload_processor:
        return None
    from omnilmm_ray.models import cpu_processor

    spec = cpu_processor(cfg.engine.model, cfg.engine.backend)
    if spec is not None:
        log.info("preprocess: %s's image processor runs on the CPU workers (%s)", cfg.engine.model, spec.arch)
    return spec


def describe_model(cfg: JobConfig) -> dict:
    """The dry run's model check, without lmdeploy (models.py's table); a model no engine captions from
    the image is a ConfigError (exit 2)."""
    from omnilmm_ray.models import Refused, check

    try:
        model = check(cfg.engine.model, cfg.engine.backend)
    except Refused as e:
        raise ConfigError(str(e)) from None
    if "processor_on_cpu_workers" in model and not cfg.preprocess.offload_processor:
        model["processor_on_cpu_workers"] = False
    return model


def _not_set(cfg: JobConfig) -> list[str]:
    """The fields not given ("inputs", "output"): config.load_config(require_io=False) filled them in."""
    given = {"inputs": cfg.inputs[0] if cfg.inputs else "<not set", "output": cfg.output}
    return [k for k, v in given.items() if v.startswith("<not set")]


def _gpus_in_use() -> float:
    """GPUs held on the cluster now: on the job's own Ray cluster (a RayJob's), its engine actors'."""
    import ray

    return ray.cluster_resources().get("GPU", 0) - ray.available_resources().get("GPU", 0)


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")


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
    quality = quality_summary(counts.quality)
    return {
        "run": run.run_id,
        "status": "succeeded",
        "rows": n,
        "counts": {
            "ok": n - errors,
            "error": errors,
            "cached": counts.cached,
            "skipped_without_image": counts.skipped,
            "flagged": quality["flagged_rows"],
        },
        # flagged rows count only when quality.error_budget_flags names their flags
        "error_rate": (errors + quality["counted_as_errors"]) / n if n else 0.0,
        "quality": quality,
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
    """`table`: from `precheck`, when the entrypoint ran it; `wait_for_gpus`: see `require_gpus`."""
    if dry_run:
        model = describe_model(cfg)
        missing = _not_set(cfg)
        if len(missing) == 2:  # `--dry-run --model X` alone checks the model (a Ray head without lmdeploy)
            return {"dry_run": {"model": model}}
        if missing:
            flag = "--input" if missing[0] == "inputs" else "--output"
            raise ConfigError(f"{missing[0]}: missing; pass {flag} or set '{missing[0]}' in the config file")
        table = check_output(cfg, write=False)
        with storage_access("inputs", cfg.inputs):  # the output answered: a storage error is the inputs'
            return {
                "dry_run": {**describe(cfg, table.open_run(cfg, write=False, listings=False)), "model": model}
            }
    table = table or check_output(cfg)
    require_gpus(cfg, wait_for_gpus)
    with Lease(cfg.output, cfg.sink.lock_ttl_s, cfg.sink.storage_options) as lease:
        kill_point("lease")
        lease.ensure()
        if gone := table.remove_leftovers():  # what kills left; only the lease holder removes anything
            log.info(
                "removed %d temporary file(s) or empty run folder(s) that killed jobs left: %s",
                len(gone),
                gone[:5],
            )
        publish(table, lease.ensure)  # a sealed run whose publish a kill or an error stopped: first
        with storage_access("inputs", cfg.inputs):  # the output answered: a storage error is the inputs'
            run = table.open_run(cfg, write=False)
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
        backend = None
        if not todo and not run.resumed:
            backend = preflight(cfg)  # nothing to caption, so no engine actor resolves the model
            table.write_plan(run)
            kill_point("plan")
        reuse = table.reuse_index(cfg) if cfg.sink.reuse_captions and todo else None
        committer = ShardCommitter(
            run.uri,
            todo,
            cfg.sink.storage_options,
            cfg.sink.commit_rows,
            progress,
            output_schema(cfg.prompt_names),
            writers=WRITERS,
            guard=lease.ensure,  # each write checks the lease on its own thread, queued ones included
        )
        reporter = ProgressReporter(
            todo,
            plan_counts(todo, cfg.input.storage_options),
            progress.done_indices,
            shards_before=len(run.shards) - len(todo),
            shards_total=len(run.shards),
            every_s=cfg.report.progress_s,
            metrics=DriverMetrics() if cfg.report.metrics else None,
            gpus=None if cfg.engine.backend == "fake" else _gpus_in_use,
        )
        t0, processed = time.time(), 0
        typos = TypoCheck(any(t.fields for t in templates(cfg.prompt, cfg.prompts).values()))
        if todo:
            from omnilmm_ray.pipeline import caption_batches

            key = gate.new_key()
            batches = caption_batches(
                todo, cfg, run.uri, reuse, progress.done_indices, processor_offload(cfg), key
            )
            reporter.start()
            try:
                for batch in batches:
                    if backend is None:  # rows came back: the gate opened, an engine serves the model
                        backend = gate.wait_open(key, 0)
                        log.info("engine: %s -> %s backend", cfg.engine.model, backend)
                        lease.ensure()
                        table.write_plan(run)
                        kill_point("plan")
                    processed += sum(1 for e in batch.column("shard_rows").to_pylist() if e is None)
                    lease.ensure()  # stop at once; `add`'s writes check again right before they run
                    committer.add(batch)
                    typos.observe(batch)
                    if typo := typos.verdict(committer.committed):
                        raise ConfigError(typo)
                    reporter.observe(batch, len(committer.committed))
                committer.flush()  # starts no write; each checks the lease when it runs (its guard)
                if typo := typos.verdict(committer.committed):  # shards committed by the flush
                    raise ConfigError(typo)
                reporter.commits(len(committer.committed))
            except Exception as e:
                refused = _engine_refused(cfg, key, e)
                if refused:
                    raise ConfigError(refused) from None
                raise
            finally:
                # Shut Ray Data's executor and its engine actors down now, on an error too, instead of
                # whenever the iterator is garbage-collected; then drop this attempt's flight records.
                batches.close()
                committer.close()  # the writes in flight hold rows already captioned: let them land
                clear_flight_records()
                gate.clear(key)
                reporter.stop()
        if committer.uncommitted():
            raise RuntimeError(
                f"pipeline ended with shards not fully captioned: {committer.uncommitted()[:5]}"
            )
        wall = time.time() - t0
        kill_point("verify")
        counts = verify_run(run.uri, run.shards, cfg.sink.storage_options, cfg.quality)
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
            "started_at": _utc(t0),
            "gpu_seconds": round(reporter.gpu_seconds, 1),
        }
        summary = summarize(cfg, run, counts, attempt)
        # A resumed run keeps what its earlier attempts' summary recorded (one that crashed left none).
        summary["attempts"] = [*(ended or {}).get("attempts", []), attempt]
        summary["gpu_seconds"] = round(sum(a.get("gpu_seconds") or 0 for a in summary["attempts"]), 1)
        summary["finished_at"] = _utc(time.time())
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
                f"{dict(list(summary['errors_by_kind'].items())[:3])}; summary: {join(run.uri, '_summary.json')}"
            )
        lease.ensure()
        # Before the seal: a crash up to here leaves the run unsealed, and its resumption writes the index.
        build_index(
            run.uri, [s.shard_id for s in run.shards], counts.rows, cfg.sink.storage_options, cfg.prompt_names
        )
        write_bytes_atomic(fs, join(path, "_SUCCESS"), b"")
        kill_point("sealed")
        summary["snapshot"] = publish(table, lease.ensure)  # a failure: exit 1, and the rerun publishes
        return summary
