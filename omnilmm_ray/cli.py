"""Command line: `python jobs/caption.py --input ... --output ...` (also under `ray job submit`).

Exit codes: 0 run finished (bad images are rows), 2 bad config / input / output, 3 error budget exceeded,
4 output locked by another job, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

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
    p.add_argument("--dry-run", action="store_true", help="list what would run and run nothing")
    p.add_argument("--print-config", action="store_true", help="print the JSON schema of the config and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        print(json.dumps(JobConfig.model_json_schema(), indent=1))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from omnilmm_ray.job import ErrorBudgetExceeded, run_job
    from omnilmm_ray.lease import LeaseHeld, LeaseLost

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "dry_run", "print_config")}
    connected = False
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            print(json.dumps(run_job(cfg, dry_run=True), indent=1))
            return 0
        import ray

        connected = not ray.is_initialized()  # called in-process (tests): the caller's Ray stays up
        ray.init(ignore_reinit_error=True, log_to_driver=True)
        if cfg.engine.backend == "fake":
            from omnilmm_ray.engines.fake import BANNER

            print(f"\n{'!' * 80}\n!! {BANNER}\n{'!' * 80}\n", file=sys.stderr)
        summary = run_job(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ErrorBudgetExceeded as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except LeaseHeld as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except LeaseLost as e:  # expected under a takeover: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
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
