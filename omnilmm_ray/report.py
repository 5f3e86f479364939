"""`omnilmm-caption report --output URI [--json]`: the history of an output's runs, from the files each run
leaves (`run=<id>/_plan.json`, `_summary.json`, `_SUCCESS`); reads no shard file.

A run's summary is written when its pipeline has finished; a run without one is in progress, or was
stopped (a crash, a kill) and is resumed by the next job on the output.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

from omnilmm_ray.storage import join, read_json
from omnilmm_ray.table import OutputTable

RUN_ID_FORMAT = "%Y%m%dT%H%M%S%fZ"


def _parse(ts: str | None) -> dt.datetime | None:
    if not ts:
        return None
    try:
        return dt.datetime.fromisoformat(ts)
    except ValueError:
        return None


def _run_start(run_id: str) -> dt.datetime | None:
    """Runs are named after the UTC time they were planned."""
    try:
        return dt.datetime.strptime(run_id, RUN_ID_FORMAT).replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def run_record(run_id: str, plan: dict | None, summary: dict | None, sealed: bool) -> dict:
    """One run's line of history. Summaries written before `attempts` / `gpu_seconds` existed give what
    they hold (`this_attempt`); what no file records is None."""
    start = _run_start(run_id)
    rec: dict = {
        "run": run_id,
        "status": "sealed" if sealed else "in progress or stopped (the next job resumes it)",
        "start": start.isoformat(timespec="seconds") if start else None,
        "shards": len(plan["shards"]) if plan else None,
        "duration_s": None,
        "images": None,
        "ok": None,
        "errors": None,
        "cached": None,
        "flagged": None,  # ok rows with a quality flag (they keep their caption)
        "images_per_s": None,
        "gpu_seconds": None,
        "error_kinds": {},
        "flags": {},  # rows per quality flag, most frequent first
        "summary": None,
    }
    if summary is None:
        return rec
    if not sealed:
        rec["status"] = summary.get("status", "not sealed")
    attempts = summary.get("attempts") or [summary.get("this_attempt") or {}]
    wall = sum(a.get("wall_s") or 0 for a in attempts)
    processed = sum(a.get("rows_processed") or 0 for a in attempts)
    end = _parse(summary.get("finished_at"))
    counts = summary.get("counts", {})
    quality = summary.get("quality") or {}  # absent from summaries written before quality flags
    rec.update(
        duration_s=round((end - start).total_seconds(), 1) if end and start else round(wall, 1),
        images=summary.get("rows"),
        ok=counts.get("ok"),
        errors=counts.get("error"),
        cached=counts.get("cached"),
        flagged=quality.get("flagged_rows"),
        flags=dict(quality.get("by_flag", {})),
        images_per_s=round(processed / wall, 2) if wall > 0 else None,
        gpu_seconds=summary.get("gpu_seconds"),
        error_kinds={
            k: {"count": v["count"], "examples": v.get("examples", [])}
            for k, v in summary.get("errors_by_kind", {}).items()
        },
    )
    return rec


def history(output: str, storage_options: dict | None = None) -> list[dict]:
    """Every run of an output, oldest first (a few small GETs per run, made in parallel)."""
    table = OutputTable(output, storage_options)
    ids = table.run_ids()

    def one(rid: str) -> dict | None:
        path = join(table.path, f"run={rid}")
        plan = read_json(table.fs, join(path, "_plan.json"))
        if plan is None:  # a job killed inside a run's first write left no run (the next job tidies up)
            return None
        sealed = table.fs.exists(join(path, "_SUCCESS"))
        rec = run_record(rid, plan, read_json(table.fs, join(path, "_summary.json")), sealed)
        if rec["images"] is not None:
            rec["summary"] = join(table.run_uri(rid), "_summary.json")
        if not sealed and (gone := table.abandoned(rid)):
            rec["status"] = f"abandoned: {gone['reason']} (replaced by run {gone['by']})"
        return rec

    with ThreadPoolExecutor(8) as pool:
        return [r for r in pool.map(one, ids) if r is not None]


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _num(v) -> str:
    return "-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:,.1f}"


COLUMNS = (
    "run", "start", "duration", "images", "ok", "flagged", "errors", "cached", "images/s", "GPU-s", "status"
)  # fmt: skip


def format_text(records: list[dict], output: str) -> str:
    rows = [
        (
            r["run"],
            (r["start"] or "-").replace("+00:00", "Z"),
            _duration(r["duration_s"]),
            _num(r["images"]),
            _num(r["ok"]),
            _num(r["flagged"]),
            _num(r["errors"]),
            _num(r["cached"]),
            _num(r["images_per_s"]),
            _num(r["gpu_seconds"]),
            r["status"],
        )
        for r in records
    ]
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    for r, row in zip(records, rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        for kind, v in r["error_kinds"].items():
            examples = ", ".join(v["examples"])
            lines.append(f"    {kind}: {v['count']:,}" + (f" (e.g. {examples})" if examples else ""))
        if r.get("flags"):
            lines.append("    flags: " + ", ".join(f"{k} {n:,}" for k, n in r["flags"].items()))
    return "\n".join(lines)
