"""One night, as its phases: lease -> tidy -> plan -> caption (the plan written once an engine serves the
model) -> verify -> seal -> publish. What is checked before (the output, GPUs, the model): checks.py.

Expects Ray to be initialised by the entrypoint (jobs/caption.py); library code never calls `ray.init`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field

from omnilmm_ray import checks, gate
from omnilmm_ray.commit import (
    WRITERS,
    Progress,
    RunCounts,
    ShardCommitter,
    load_progress,
    remove_files,
    reopen_failed_shards,
    verify_run,
)
from omnilmm_ray.config import ConfigError, JobConfig
from omnilmm_ray.errors import storage_access
from omnilmm_ray.faults import clear_flight_records, kill_point
from omnilmm_ray.lease import Lease
from omnilmm_ray.memory import cluster_memory
from omnilmm_ray.metrics import DriverMetrics
from omnilmm_ray.progress import ProgressReporter, plan_counts
from omnilmm_ray.prompts import TypoCheck, templates
from omnilmm_ray.quality import quality_summary
from omnilmm_ray.reuse import build_index
from omnilmm_ray.schema import SHARD_KINDS, output_schema
from omnilmm_ray.snapshot import publish
from omnilmm_ray.sources import Shard
from omnilmm_ray.storage import join, read_json, write_bytes_atomic, write_json
from omnilmm_ray.table import OutputTable, Run

log = logging.getLogger(__name__)


class ErrorBudgetExceeded(RuntimeError):
    pass


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


def _gpus_in_use() -> float:
    """GPUs held on the cluster now: on the job's own Ray cluster (a RayJob's), its engine actors'."""
    import ray

    return ray.cluster_resources().get("GPU", 0) - ray.available_resources().get("GPU", 0)


def _utc(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")


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


@dataclass
class Night:
    """One attempt at a run: what the plan phase found, and what the caption phase did."""

    run: Run
    progress: Progress  # what earlier attempts of this run committed
    todo: list[Shard]  # the shards left to caption
    ended: dict | None  # the summary an earlier attempt of this run wrote (one that failed its budget)
    backend: str | None = None  # the engine backend that served the model
    attempt: dict = field(default_factory=dict)  # this attempt's record in the summary


def run_job(
    cfg: JobConfig, dry_run: bool = False, table: OutputTable | None = None, wait_for_gpus: bool = True
) -> dict:
    """One night, as its phases. `table`: from `precheck`, when the entrypoint ran it; `wait_for_gpus`:
    see `checks.require_gpus`."""
    if dry_run:
        return {"dry_run": checks.dry_run(cfg)}
    table = table or checks.check_output(cfg)
    checks.require_gpus(cfg, wait_for_gpus)
    with Lease(cfg.output, cfg.sink.lock_ttl_s, cfg.sink.storage_options) as lease:
        kill_point("lease")
        tidy(table, lease)  # what killed jobs left; a sealed run whose publish was cut short
        night = plan(cfg, table)  # resume the unsealed run, or plan a new one over what is new
        caption(cfg, table, night, lease)  # the pipeline: every shard left is captioned and committed
        kill_point("verify")
        counts = verify_run(night.run.uri, night.run.shards, cfg.sink.storage_options, cfg.quality)
        summary = seal(cfg, table, night, counts, lease)  # summary, error budget, reuse index, _SUCCESS
        summary["snapshot"] = publish(table, lease.ensure)  # a failure: exit 1, and the rerun publishes
        return summary


def tidy(table: OutputTable, lease: Lease) -> None:
    lease.ensure()
    if gone := table.remove_leftovers():  # only the lease holder removes anything
        log.info(
            "removed %d temporary file(s) or empty run folder(s) that killed jobs left: %s",
            len(gone),
            gone[:5],
        )
    publish(table, lease.ensure)


def plan(cfg: JobConfig, table: OutputTable) -> Night:
    with storage_access("inputs", cfg.inputs):  # the output answered: a storage error is the inputs'
        run = table.open_run(cfg, write=False)
    progress = load_progress(run.uri, cfg.sink.storage_options)
    remove_files(table.fs, progress.orphans)
    ended = read_json(table.fs, join(run.uri, "_summary.json")) if run.resumed else None
    failed_kinds = cfg.sink.retry_kinds() & SHARD_KINDS & set((ended or {}).get("errors_by_kind", {}))
    if failed_kinds:  # the run failed its error budget: read the shards that failed midway again
        reopen_failed_shards(run.uri, run.shards, failed_kinds, progress, cfg.sink.storage_options)
    night = Night(run, progress, [s for s in run.shards if s.shard_id not in progress.complete], ended)
    log.info(
        "run %s (%s): %d shards, %d already committed",
        run.run_id,
        "resumed" if run.resumed else "new",
        len(run.shards),
        len(run.shards) - len(night.todo),
    )
    if not night.todo and not run.resumed:
        night.backend = checks.preflight(cfg)  # nothing to caption, so no engine actor resolves the model
        table.write_plan(run)
        kill_point("plan")
    return night


def caption(cfg: JobConfig, table: OutputTable, night: Night, lease: Lease) -> None:
    """Caption the shards left and commit their rows; the plan of a new run is written once rows come back
    (an engine serves the model), so a job that fails before leaves no run."""
    run, todo, progress = night.run, night.todo, night.progress
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
        memory=cluster_memory,
    )
    t0, processed = time.time(), 0
    typos = TypoCheck(any(t.fields for t in templates(cfg.prompt, cfg.prompts).values()))
    if todo:
        from omnilmm_ray.pipeline import caption_batches

        reuse = table.reuse_index(cfg) if cfg.sink.reuse_captions else None
        key = gate.new_key()
        batches = caption_batches(
            todo, cfg, run.uri, reuse, progress.done_indices, processor_offload(cfg), key
        )
        reporter.start()
        try:
            for batch in batches:
                if night.backend is None:  # rows came back: the gate opened, an engine serves the model
                    night.backend = gate.wait_open(key, 0)
                    log.info("engine: %s -> %s backend", cfg.engine.model, night.backend)
                    lease.ensure()
                    table.write_plan(run)
                    kill_point("plan")
                processed += sum(1 for e in batch.column("shard_rows").to_pylist() if e is None)
                lease.ensure()  # stop at once; `add`'s writes check again right before they run
                committer.add(batch)
                typos.observe(batch)
                reporter.observe(batch, len(committer.committed))
            committer.flush()  # starts no write; each checks the lease when it runs (its guard)
            if typo := typos.verdict():  # before the seal: the rows stay in an unsealed run
                raise ConfigError(typo)
            reporter.commits(len(committer.committed))
        except Exception as e:
            refused = checks.engine_refused(cfg, key, e)
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
        raise RuntimeError(f"pipeline ended with shards not fully captioned: {committer.uncommitted()[:5]}")
    wall = time.time() - t0
    night.attempt = {
        "resumed": run.resumed,
        "shards_committed_before": len(run.shards) - len(todo),
        "rows_in_parts_before": sum(len(v) for v in progress.done_indices.values()),
        "shards_processed": len(todo),
        "rows_processed": processed,
        "duplicates_dropped": committer.duplicates_dropped,
        "wall_s": round(wall, 3),
        "images_per_s": round(processed / wall, 3) if wall > 0 else None,
        "backend": night.backend,
        "started_at": _utc(t0),
        "gpu_seconds": round(reporter.gpu_seconds, 1),
    }


def seal(cfg: JobConfig, table: OutputTable, night: Night, counts: RunCounts, lease: Lease) -> dict:
    """Write the run's summary; within the error budget, its reuse index and then `_SUCCESS`."""
    run = night.run
    summary = summarize(cfg, run, counts, night.attempt)
    # A resumed run keeps what its earlier attempts' summary recorded (one that crashed left none).
    summary["attempts"] = [*(night.ended or {}).get("attempts", []), night.attempt]
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
    return summary
