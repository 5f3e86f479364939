"""The engine gate: the first engine actor says which backend serves the model; shards are read only then.

Resolving the backend needs lmdeploy imported on a GPU worker, which is what an engine actor's start does
anyway. So instead of a separate GPU task before the pipeline (one more process paying lmdeploy's import
and CUDA set-up, ~17 s on an H200 host), the pipeline starts at once: the engine actors start while the read
tasks wait here, and the first actor to resolve the backend opens the gate (or shuts it with the reason).
A model that no engine serves therefore still fails the job before any shard is read, and the plan is
written only after the gate opened (job.py), so such a job leaves no run behind.

The answer lives in Ray's GCS key-value store under this attempt of the job (faults.attempt_id), beside
the flight records, and is dropped with them when the pipeline ends.
"""

from __future__ import annotations

import json
import time

from omnilmm_ray.faults import _LocalKV, _ray_context, _RayKV, attempt_id

# Backends whose engine actor takes the model's patches from the CPU workers (vision.py) instead of images.
TAKES_PATCHES = ("turbomind", "fake")

_local = _LocalKV()  # a stage called without Ray (unit tests): one process
_opened: dict[str, str] = {}  # per worker process: an open gate is never asked again


class EngineRefused(ValueError):
    """No engine serves the configured model; the message names the field and what to do."""


class EngineNotStarted(TimeoutError):
    """No engine actor got as far as resolving the backend within `engine.start_timeout_s`."""

    def __init__(self, timeout_s: float):
        super().__init__(
            f"engine.tp: no engine actor started within {timeout_s:.0f}s (engine.start_timeout_s); add GPU "
            "workers, lower engine.tp, or use --engine fake on a machine without GPUs"
        )


def _kv():
    return _RayKV() if _ray_context() else _local


def _key() -> str:
    return f"{attempt_id()}/engine"


def open_gate(backend: str) -> None:
    _kv().put(_key(), json.dumps({"backend": backend}).encode())


def shut_gate(reason: str) -> None:
    _kv().put(_key(), json.dumps({"error": reason}).encode())


def peek() -> dict | None:
    """The gate's state for this attempt: {"backend": ...}, {"error": ...}, or None while undecided."""
    v = _kv().get(_key())
    return json.loads(v) if v else None


def wait_open(timeout_s: float, poll_s: float = 0.25) -> str:
    """The resolved backend; raises EngineRefused / EngineNotStarted. Polls: one KV read per `poll_s`."""
    key = _key()
    if key in _opened:
        return _opened[key]
    deadline = time.monotonic() + timeout_s
    while (state := peek()) is None:
        if time.monotonic() > deadline:
            raise EngineNotStarted(timeout_s)
        time.sleep(poll_s)
    if "error" in state:
        raise EngineRefused(state["error"])
    _opened[key] = state["backend"]
    return state["backend"]
