"""The engine gate: the first engine actor says which backend serves the model; shards are read only then.

Resolving the backend needs lmdeploy imported on a GPU worker, which is what an engine actor's start does
anyway. So instead of a separate GPU task before the pipeline (one more process paying lmdeploy's import
and CUDA set-up, ~17 s on an H200 host), the pipeline starts at once and the first actor to get its answer
opens the gate (or shuts it with the reason). Ray Data launches the read tasks beside the actors' start;
they wait here, so no shard is read before the answer. The answer is given once the engine has shown that
it captions from the image (engines/sight.py): a model whose engine drops images is refused like a model
no engine serves. For a family this project's GPU tests ran with the same lmdeploy (models.Route.proven)
the gate opens as soon as the backend is resolved, so the first batch is read and decoded while the engine
builds (the backend is known ~2.5 s before a TurboMind engine is); should such an engine still fail the
image check, the gate is shut after all and the job fails the same way before any row is committed. The
CPU stages learn from the answer whether the backend takes patches (models.PATCH_BACKENDS). A read task
that waits longer than `engine.start_timeout_s` fails the job with `EngineNotStarted` (no actor could be
placed, or none started). A refused model therefore fails the job with the actor's reason, and the plan
is written only after rows came back (job.py), so such a job leaves no run behind.

The answer lives in Ray's GCS key-value store (beside the flight records) under a key made for one
pipeline (`new_key`), so a second pipeline in the same driver (the Python API) never sees an earlier answer;
the driver drops it when the pipeline ends. A refusal is kept under a key of its own, so an actor that
opens the gate later never hides it.
"""

from __future__ import annotations

import json
import time
import uuid

from omnilmm_ray.faults import _LocalKV, _ray_context, _RayKV

_local = _LocalKV()  # a stage called without Ray (unit tests): one process
_opened: dict[str, str] = {}  # per worker process: an open gate is never asked again
_REFUSED = "/refused"


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


def new_key() -> str:
    return f"gate/{uuid.uuid4().hex}"


def open_gate(key: str, backend: str) -> None:
    _kv().put(key, json.dumps({"backend": backend}).encode())


def shut_gate(key: str, reason: str) -> None:
    _kv().put(key + _REFUSED, json.dumps({"error": reason}).encode())


def clear(key: str) -> None:
    _kv().delete(key, by_prefix=True)


def peek(key: str) -> dict | None:
    """The gate's state: {"error": ...} once any actor refused, else {"backend": ...}, or None while
    undecided."""
    v = _kv().get(key + _REFUSED) or _kv().get(key)
    return json.loads(v) if v else None


def wait_open(key: str, timeout_s: float, poll_s: float = 0.25) -> str:
    """The resolved backend; raises EngineRefused / EngineNotStarted. Polls: one KV read per `poll_s`."""
    if key in _opened:
        return _opened[key]
    deadline = time.monotonic() + timeout_s
    while (state := peek(key)) is None:
        if time.monotonic() > deadline:
            raise EngineNotStarted(timeout_s)
        time.sleep(poll_s)
    if "error" in state:
        raise EngineRefused(state["error"])
    _opened[key] = state["backend"]
    return state["backend"]
