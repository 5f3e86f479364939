"""The memory part of the progress line: the driver's resident memory and its private part, and the object store
of the Ray cluster the driver is connected to (used / capacity, bytes spilled to disk so far), what
`ray memory --stats-only` shows, read the same way, so a long run's growth is in its log:

    memory: driver 612 MB (431 MB private), object store 1.2/18.0 GB, spilled 0 B

The driver's resident memory also counts the object store's shared pages it has read results from: they are the
store's memory (counted once per node, at most the store's size) and their number creeps up over a long run as
the store hands out fresh parts of its arena. The private part is what the driver itself holds
(bench/results/driver-rss-2026-12-07b.md).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


PROC_FIELDS = ("VmRSS", "RssAnon", "RssShmem")


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """A process's memory from Linux's /proc/PID/status, in bytes: VmRSS (resident), RssAnon (private) and
    RssShmem (shared-memory pages it has touched, such as the object store's). OSError off Linux or once the
    process is gone."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in PROC_FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


def driver_memory() -> dict[str, int | None]:
    """This process's resident memory and its private part, in bytes (None elsewhere than Linux): two numbers,
    not worth a psutil dependency."""
    try:
        m = proc_memory()
    except (OSError, ValueError):
        m = {}
    return {"driver_rss": m.get("VmRSS"), "driver_private": m.get("RssAnon")}


def cluster_memory() -> dict[str, int | None]:
    """The driver's memory (driver_memory) and the object store of the Ray cluster this process is connected to, as
    `ray memory --stats-only` reads them (ray._private.internal_api: no public API gives the store's use or
    spill; on any failure those keys are left out and the line shows the driver alone)."""
    out = driver_memory()
    try:
        import ray
        from ray._private import internal_api, state

        if not ray.is_initialized():
            return out
        # The driver's own GCS connection (what ray.nodes() uses), not a client of our own: a client kept past
        # its cluster's end made the next job's driver exit with status 1 (Ray ends a process whose GCS client
        # loses its GCS), seen when one process ran jobs on two Ray clusters one after the other.
        stats = internal_api.get_memory_info_reply(state.state, timeout_seconds=5).store_stats
        out.update(
            store_used=stats.object_store_bytes_used,
            store_capacity=stats.object_store_bytes_avail,  # its name notwithstanding: `ray memory` divides by it
            spilled=stats.spilled_bytes_total,
        )
    except Exception as e:  # a GCS hiccup or a Ray without these internals must not stop the progress line
        log.debug("could not read the object store's stats: %s", e)
    return out


def memory_text(m: dict[str, int | None]) -> str:
    parts = []
    if m.get("driver_rss") is not None:
        private = m.get("driver_private")
        parts.append(
            f"driver {_bytes(m['driver_rss'])}" + (f" ({_bytes(private)} private)" if private else "")
        )
    if m.get("store_capacity"):
        gb = m["store_used"] / 1e9, m["store_capacity"] / 1e9
        parts.append(f"object store {gb[0]:.1f}/{gb[1]:.1f} GB, spilled {_bytes(m['spilled'])}")
    return ", ".join(parts) or "?"
