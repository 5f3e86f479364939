"""Command line: `omnilmm-caption --input ... --output ...` (also under `ray job submit`),
`omnilmm-caption report --output URI` for the history of an output's runs, and `omnilmm-caption latest
--output URI --to FILE` for the newest caption per image.

Exit codes: 0 run finished (bad images are rows), 2 bad config / input / output, 3 error budget exceeded,
4 output locked by another job, 130 / 143 interrupted (SIGINT / SIGTERM), 1 anything else. The last line
printed says why (`error: ...`, `interrupted; ...`, `done: ...`); on failure it ends with ` [exit N]`,
because `ray job submit` exits 1 whatever the job's code and a submitter reads it from the log's last line.
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

PROG = "omnilmm-caption"
SUBCOMMANDS = {
    "report": "history of an output's runs: report --output URI [--json] [--last N]",
    "latest": "newest caption per image across sealed runs, to Parquet: latest --output URI --to FILE",
}


class UsageError(Exception):
    """A command line argparse refuses: exit 2 through `_last`, so its last line keeps the exit contract."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print its own last line and exit 2 itself
        self.print_usage(sys.stderr)
        raise UsageError(f"{message}; see {self.prog} --help")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(
        prog=PROG,
        usage=f"%(prog)s --input URI [--input URI ...] --output URI [options]\n"
        f"       %(prog)s {{{','.join(SUBCOMMANDS)}}} ...",
        description="Caption image shards with a VLM on Ray.",
        epilog="subcommands (each takes --help):\n"
        + "\n".join(f"  {name:8} {text}" for name, text in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective config (file + flags + defaults) as YAML, secrets masked, and exit",
    )
    p.add_argument("--print-schema", action="store_true", help="print the config's JSON schema and exit")
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


def _error(e: BaseException) -> str:
    return "error: " + " ".join(str(e).split())


def _crash(e: BaseException) -> str:
    """The one line for an unexpected exception (its traceback is printed before it)."""
    cause = getattr(e, "cause", None) or e  # a RayTaskError carries the worker's exception
    return (f"error: {type(cause).__name__}: {cause}".splitlines() or ["error"])[0]


def _last(line: str, code: int) -> int:
    """Print a failure's last line and return its exit code. ` [exit N]` is a contract: `ray job submit`
    exits 1 for every failure, so a submitter carries the job's own code on from this suffix."""
    sys.stdout.flush()  # in a log of stdout and stderr together, nothing printed before may land after it
    print(redact.redact_text(f"{line} [exit {code}]"), file=sys.stderr, flush=True)
    return code


def _overrides(args: argparse.Namespace) -> dict:
    skip = ("config", "dry_run", "print_config", "print_schema")
    return {k: v for k, v in vars(args).items() if k not in skip}


def _print_config(args: argparse.Namespace) -> int:
    import yaml

    try:
        cfg = load_config(args.config, _overrides(args), require_io=False)
    except ConfigError as e:
        return _last(_error(e), 2)
    redact.register(redact.option_secrets(cfg.input.storage_options))
    redact.register(redact.option_secrets(cfg.sink.storage_options))
    # model_dump masks storage_options; redact_text catches a secret anywhere else (a token in a prompt)
    print(redact.redact_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Every exit but success and --help ends with `_last`'s line, whatever failed and where."""
    argv = sys.argv[1:] if argv is None else argv
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _catch_signals()
        return _dispatch(argv)
    except UsageError as e:
        return _last(_error(e), 2)
    except KeyboardInterrupt as e:  # outside a run (report, latest, --print-config): nothing to resume
        return _last("interrupted; rerun the same command", getattr(e, "exit_code", 130))
    except SystemExit as e:
        if not e.code:
            raise  # --help
        if e.code == signal.SIGTERM:  # ray.init's own handler (sys.exit(signum)) until _catch_signals runs
            return _last("interrupted; rerun the same command to resume", 128 + signal.SIGTERM)
        code = e.code if isinstance(e.code, int) else 1
        return _last(f"error: exited with {e.code}", code)
    except Exception as e:  # report, latest: outside the run's redacted output, so redacted here
        print(redact.redact_text(traceback.format_exc()), file=sys.stderr, end="")
        return _last(_crash(e), 1)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    if argv[:1] == ["latest"]:
        return latest_main(argv[1:])
    args = parse_args(argv)
    if args.print_schema:
        print(json.dumps(JobConfig.model_json_schema(), indent=1))
        return 0
    redact.register(redact.env_secrets())
    if args.print_config:
        return _print_config(args)
    with redact.redacting_output():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    # Our INFO lines, other libraries' warnings only (botocore logs where it found credentials at INFO).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("omnilmm_ray").setLevel(logging.INFO)
    from omnilmm_ray import checks
    from omnilmm_ray.checks import precheck
    from omnilmm_ray.job import ErrorBudgetExceeded, run_job
    from omnilmm_ray.lease import LeaseHeld, LeaseLost

    overrides = _overrides(args)
    connected = False
    try:
        # a dry run without --input and --output checks the model alone (job.run_job)
        cfg = load_config(args.config, overrides, require_io=not args.dry_run)
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
        summary = run_job(cfg, table=table, wait_for_gpus=checks.attached_to_cluster())
        line, code = done_line(summary, cfg.output), 0
    except ConfigError as e:
        line, code = _error(e), 2
    except ErrorBudgetExceeded as e:
        line, code = _error(e), 3
    except LeaseHeld as e:
        line, code = _error(e), 4
    except LeaseLost as e:  # expected under a takeover: one line, no traceback
        line, code = f"error: {e}", 1
    except KeyboardInterrupt as e:  # the lease was released on the way here
        line, code = "interrupted; rerun the same command to resume", getattr(e, "exit_code", 130)
    except Exception as e:  # the traceback for the logs, then one line that says what failed
        traceback.print_exc()
        line, code = _crash(e), 1
    finally:
        if connected:  # end the Ray job now, not at interpreter exit: its actors (and a Ray it started) go
            import ray

            ray.shutdown()
    # Printed after Ray's shutdown, whose own output would otherwise follow it.
    if code:
        return _last(line, code)
    print(line, flush=True)
    return 0


def done_line(summary: dict, output: str) -> str:
    from omnilmm_ray.storage import join

    c = summary["counts"]
    top = list(summary["errors_by_kind"].items())[:3]
    errors = ", ".join(f"{k} {v['count']}" for k, v in top) or "none"
    # Flagged rows are ok rows (they keep their caption), so "ok" alone would hide them.
    quality = summary.get("quality") or {}
    flags = ", ".join(f"{k} {n}" for k, n in list(quality.get("by_flag", {}).items())[:3]) or "none"
    return (
        f"done: run {summary['run']}: {summary['rows']} rows ({c['ok']} ok, {quality.get('flagged_rows', 0)} of "
        f"them flagged, {c['error']} errors, {c['cached']} reused), {summary['this_attempt']['images_per_s']} "
        f"images/s -> {output}; top errors: {errors}; top flags: {flags}; "
        f"summary: {join(output.rstrip('/'), 'run=' + summary['run'], '_summary.json')}"
    )


def report_main(argv: list[str] | None = None) -> int:
    """`omnilmm-caption report --output URI [--json]`: one line per run of an output, oldest first."""
    ap = _Parser(prog=f"{PROG} report", description="History of the runs of a captioning output.")
    ap.add_argument("--output", required=True, help="the job's output table URI")
    ap.add_argument("--json", action="store_true", help="print a JSON list of runs instead of a table")
    ap.add_argument("--last", type=int, help="only the newest N runs")
    args = ap.parse_args(argv)
    from omnilmm_ray.errors import storage_access
    from omnilmm_ray.report import format_text, history

    redact.register(redact.env_secrets())
    try:
        with storage_access("output", args.output):
            records = history(args.output)
        if not records:  # a missing bucket or folder lists as empty: most likely a wrong URI
            raise ConfigError(f"output: no run in {args.output}; check the URI (runs are run=<id>/ folders)")
    except ConfigError as e:
        return _last(_error(e), 2)
    if args.last:
        records = records[-args.last :]
    text = json.dumps(records, indent=1) if args.json else format_text(records, args.output)
    print(redact.redact_text(text))
    return 0


def latest_main(argv: list[str] | None = None) -> int:
    """`omnilmm-caption latest --output URI --to FILE` (or `python jobs/latest.py ...`): the newest caption
    per image across sealed runs."""
    ap = _Parser(prog=f"{PROG} latest", description="Write the newest caption per image to Parquet.")
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
        return _last(_error(e), 2)
    print(f"{latest_to_parquet(args.output, args.to)} rows -> {redact.redact_uri(args.to)}")
    return 0
