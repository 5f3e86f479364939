"""The Python API: `caption(...)` runs one job; `build_caption_stage(cfg)` (pipeline.py) captions a Ray Dataset.

    from omnilmm_ray import caption, build_caption_stage

    summary = caption("job.yaml", inputs=["s3://bucket/shards/*.tar"], output="s3://bucket/captions")
    ds = build_caption_stage({"prompts": {"alt": "...", "tags": "..."}})(ds)

The stage's batch adapters (a user's rows in and out of the job's row shapes) are in user_stage.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnilmm_ray.config import ConfigError, JobConfig, merged, validate


def job_config(config: str | Path | dict | JobConfig | None = None, **fields: Any) -> JobConfig:
    """A YAML file, a mapping or a JobConfig, with `fields` (top-level config fields; mappings merge into
    the sections) on top; ConfigError names the wrong field."""
    if isinstance(config, JobConfig):
        data = config.model_dump(exclude_unset=True)
    elif isinstance(config, (str, Path)):
        import yaml

        try:
            data = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config {config}: cannot read YAML ({e})") from None
    else:
        data = dict(config or {})
    if isinstance(fields.get("inputs"), str):
        fields["inputs"] = [fields["inputs"]]
    return validate(merged(data, fields))


def caption(config: str | Path | dict | JobConfig | None = None, **fields: Any) -> dict:
    """Run one captioning job, as `python jobs/caption.py` does, and return its summary (`_summary.json`).

    Joins the running Ray (`ray.init()` done by the caller, or RAY_ADDRESS) or starts a local one for the
    job and stops it afterwards. Raises ConfigError (a wrong config, input or output), job.ErrorBudgetExceeded
    (rows committed, run not sealed), lease.LeaseHeld (another job writes this output).
    """
    import ray

    from omnilmm_ray.checks import attached_to_cluster, precheck
    from omnilmm_ray.job import run_job

    cfg = job_config(config, **fields)
    table = precheck(cfg)
    started = not ray.is_initialized()
    if started:
        ray.init()
    try:
        return run_job(cfg, table=table, wait_for_gpus=attached_to_cluster())
    finally:
        if started:
            ray.shutdown()
