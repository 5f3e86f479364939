"""What is checked before any work, most of it before Ray starts: the output answers and takes a write, no
job holds it, GPUs can come, the model is one an engine captions from the image; and the dry run."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections import Counter

from fsspec.implementations.local import LocalFileSystem

from omnilmm_ray import gate
from omnilmm_ray.config import ConfigError, JobConfig
from omnilmm_ray.engines import resolve_backend
from omnilmm_ray.errors import as_config_error, storage_access
from omnilmm_ray.gate import EngineNotStarted
from omnilmm_ray.lease import Lease
from omnilmm_ray.redact import redact_text
from omnilmm_ray.storage import join
from omnilmm_ray.table import PROBE, OutputTable, Run

log = logging.getLogger(__name__)


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


def engine_refused(cfg: JobConfig, key: str, e: BaseException | None) -> str | None:
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


def not_set(cfg: JobConfig) -> list[str]:
    """The fields not given ("inputs", "output"): config.load_config(require_io=False) filled them in."""
    given = {"inputs": cfg.inputs[0] if cfg.inputs else "<not set", "output": cfg.output}
    return [k for k, v in given.items() if v.startswith("<not set")]


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


def dry_run(cfg: JobConfig) -> dict:
    """`--dry-run`: the model check, and with inputs and output the run that would start; runs nothing."""
    model = describe_model(cfg)
    missing = not_set(cfg)
    if len(missing) == 2:  # `--dry-run --model X` alone checks the model (a Ray head without lmdeploy)
        return {"model": model}
    if missing:
        flag = "--input" if missing[0] == "inputs" else "--output"
        raise ConfigError(f"{missing[0]}: missing; pass {flag} or set '{missing[0]}' in the config file")
    table = check_output(cfg, write=False)
    with storage_access("inputs", cfg.inputs):  # the output answered: a storage error is the inputs'
        return {**describe(cfg, table.open_run(cfg, write=False, listings=False)), "model": model}
