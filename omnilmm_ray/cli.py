"""Command line: `python jobs/caption.py --input ... --output ...` (also under `ray job submit`).

Exit codes: 0 run finished (bad images are rows), 2 bad config / input / output, 3 error budget exceeded,
4 output locked by another job, 130 / 143 interrupted (SIGINT / SIGTERM), 1 anything else. The last line
printed says why (`error: ...`, `interrupted; ...`, `done: ...`): under `ray job submit` the job's logs end
with it, and `ray job status` shows the exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import traceback

from omnilmm_ray import redact
from omnilmm_ray.config import ConfigError, JobConfig, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="caption", description="Caption image shards with a VLM on Ray.")
    p.add_argument("--input", action="append", help="input URI or glob; repeatable")
    p.add_argument("--output", help="output table URI")
    p.add_argument("--config", help="YAML file with any config field; CLI flags win")
    p.add_argument("--engine", help="auto | turbomind | pytorch | fake")
    p.add_argument("--model", help="model id or path")
    p.add_argument("--prompt")
    p.add_argument("--batch-size", type=int, help="images per engine call")
    p.add_argument("--tp", type=int, help="GPUs per engine actor")
    p.add_argument("--min-actors", type=int)
    p.add_argument("--max-actors", type=int)
    p.add_argument("--max-side", type=int, help="resize so the long side is at most this")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--fake-delay", type=float, help="fake engine: seconds per batch")
    p.add_argument("--max-error-rate", type=float)
    p.add_argument("--max-failed-shards", type=int, help="shards that could not be read whole before exit 3")
    p.add_argument(
        "--retry-errors",
        nargs="?",
        const="retryable",
        metavar="KINDS",
        help="read again rows whose newest state is an error of these kinds (comma list, or none); no value: "
        "every retryable kind (the default)",
    )
    p.add_argument("--dry-run", action="store_true", help="list what would run and run nothing")
    p.add_argument("--print-config", action="store_true", help="print the JSON schema of the config and exit")
    return p.parse_args(argv)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised in the main thread so that the lease is released on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.exit_code = 128 + signum


def _on_signal(signum, frame):
    raise Interrupted(signum)


def _catch_signals() -> None:
    # ray.init installs its own SIGTERM handler (sys.exit, skipping our one-line message): call this after it.
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)


def _attached_to_cluster() -> bool:
    """Whether ray.init joined a cluster that existed before this job (RAY_ADDRESS, `ray job submit`, a
    `ray start` on this host), which may gain GPU workers; a Ray this process started itself never will."""
    import ray

    # No public API tells whether ray.init started the head node; when in doubt, assume a cluster (wait).
    node = getattr(ray._private.worker, "_global_node", None)
    return not getattr(node, "head", False)


def _error(e: BaseException) -> str:
    return "error: " + " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        print(json.dumps(JobConfig.model_json_schema(), indent=1))
        return 0
    redact.register(redact.env_secrets())
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with redact.redacting_output():
            _catch_signals()
            return _main(args)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _main(args: argparse.Namespace) -> int:
    # Our INFO lines, other libraries' warnings only (botocore logs where it found credentials at INFO).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("omnilmm_ray").setLevel(logging.INFO)
    from omnilmm_ray.job import ErrorBudgetExceeded, precheck, run_job
    from omnilmm_ray.lease import LeaseHeld, LeaseLost

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "dry_run", "print_config")}
    connected = False
    try:
        cfg = load_config(args.config, overrides)
        redact.register(redact.option_secrets(cfg.input.storage_options))
        redact.register(redact.option_secrets(cfg.sink.storage_options))
        if args.dry_run:
            print(json.dumps(run_job(cfg, dry_run=True), indent=1))
            return 0
        table = precheck(cfg)  # before starting Ray: a wrong output or a held lease fails in seconds
        import ray

        connected = not ray.is_initialized()  # called in-process (tests): the caller's Ray stays up
        ray.init(ignore_reinit_error=True, log_to_driver=True)
        _catch_signals()
        if cfg.engine.backend == "fake":
            from omnilmm_ray.engines.fake import BANNER

            print(f"\n{'!' * 80}\n!! {BANNER}\n{'!' * 80}\n", file=sys.stderr)
        summary = run_job(cfg, table=table, wait_for_gpus=_attached_to_cluster())
    except ConfigError as e:
        print(_error(e), file=sys.stderr)
        return 2
    except ErrorBudgetExceeded as e:
        print(_error(e), file=sys.stderr)
        return 3
    except LeaseHeld as e:
        print(_error(e), file=sys.stderr)
        return 4
    except LeaseLost as e:  # expected under a takeover: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # the lease was released on the way here
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:  # the traceback for the logs, then one line that says what failed
        traceback.print_exc()
        cause = getattr(e, "cause", None) or e  # a RayTaskError carries the worker's exception
        print(f"error: {type(cause).__name__}: {cause}".splitlines()[0], file=sys.stderr)
        return 1
    finally:
        if connected:  # end the Ray job now, not at interpreter exit: its actors (and a Ray it started) go
            import ray

            ray.shutdown()
    c = summary["counts"]
    print(
        f"done: run {summary['run']}: {summary['rows']} rows ({c['ok']} ok, {c['error']} errors, {c['cached']} "
        f"reused), {summary['this_attempt']['images_per_s']} images/s -> {cfg.output}"
    )
    return 0


def latest_main(argv: list[str] | None = None) -> int:
    """`python jobs/latest.py --output URI --to FILE`: the newest caption per image across sealed runs."""
    ap = argparse.ArgumentParser(prog="latest", description="Write the newest caption per image to Parquet.")
    ap.add_argument("--output", required=True, help="the job's output table URI")
    ap.add_argument("--to", required=True, help="Parquet file (any fsspec URI) to write the latest view to")
    args = ap.parse_args(argv)
    from omnilmm_ray.errors import storage_access
    from omnilmm_ray.table import OutputTable, latest_to_parquet

    try:
        with storage_access("output", args.output):
            sealed = OutputTable(args.output).sealed_runs()
        if not sealed:
            raise ConfigError(
                f"output: no sealed run in {args.output}; check the URI (a run is sealed when its job "
                "exits 0)"
            )
    except ConfigError as e:
        print(redact.redact_text(_error(e)), file=sys.stderr)
        return 2
    print(f"{latest_to_parquet(args.output, args.to)} rows -> {redact.redact_uri(args.to)}")
    return 0
