"""Model weights from object storage: `engine.model: s3://bucket/models/Qwen2-VL-2B-Instruct/`.

Every GPU node would otherwise fetch ~4.5 GB from the hub per engine start, and clusters without hub
access could not start at all. A model URI is downloaded once per node into a local cache folder and the
engine opens that folder:
- one download per node: a file lock per model serialises the engine actors (and the preflight task) that
  start on one node at once; the first downloads, the others wait and then find it there;
- never a half-written cache: files land in a temporary folder beside the cache entry, which is renamed
  into place only when every file is in at its listed size; a crash leaves only the temporary folder,
  which the next download removes;
- a new upload under the same URI is a new cache entry: the entry's name includes the fingerprints
  (size + ETag) of every file, so changed weights are never served from an old copy.

Hub ids and local paths (a shared volume mounted on every node) are returned as they are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from omnilmm_ray.faults import kill_point
from omnilmm_ray.storage import fingerprint, resolve

log = logging.getLogger(__name__)

CACHE_ENV = "OMNILMM_CACHE"
DEFAULT_CACHE = "/tmp/omnilmm-ray"


def is_remote(model: str) -> bool:
    """An object-store URI (s3://, gs://, az://, ...), as opposed to a hub id or a local path."""
    scheme, sep, _ = model.partition("://")
    return bool(sep) and scheme not in ("file", "local")


def cache_root(cache_dir: str | None = None) -> Path:
    """Where downloaded models live on this node: `engine.cache_dir`, else $OMNILMM_CACHE/models, else
    /tmp/omnilmm-ray/models."""
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE) / "models"


def local_model(model: str, cache_dir: str | None = None) -> str:
    """`engine.model` -> what the engine opens: a cached local copy of an object-store URI, else `model`."""
    if not is_remote(model):
        return model
    return str(download_once(model, cache_root(cache_dir))[0])


def _listing(model: str) -> tuple[object, str, dict[str, dict]]:
    fs, root = resolve(model)
    root = root.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except Exception as e:
        raise ValueError(
            f"engine.model: cannot list {model} ({type(e).__name__}: {e}); check the URI and that the "
            "GPU workers have credentials for it (AWS_* environment, instance role)"
        ) from None
    files = {p[len(root) + 1 :]: info for p, info in found.items() if info.get("type") != "directory"}
    if "config.json" not in files:
        raise ValueError(
            f"engine.model: {model} holds no config.json ({len(files)} file(s) found); give the folder "
            "that holds the model's config.json and weights"
        )
    return fs, root, files


def download_once(model: str, root: Path) -> tuple[Path, bool]:
    """Ensure a complete local copy of the model folder `model` under `root`; returns (its path, whether
    this call downloaded it)."""
    from filelock import FileLock

    fs, src, files = _listing(model)
    version = hashlib.sha256(
        "\n".join([model.rstrip("/"), *(f"{k} {fingerprint(files[k])}" for k in sorted(files))]).encode()
    ).hexdigest()[:16]
    name = f"{src.rstrip('/').rsplit('/', 1)[-1]}-{version}"
    dest = root / name
    if dest.is_dir():
        return dest, False
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{name}.lock")):
        if dest.is_dir():  # another process on this node finished it while we waited
            return dest, False
        for stale in root.glob(f".tmp-{name}-*"):  # left by a crashed download: we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        log.info("model: downloading %s (%d files) to %s", model, len(files), dest)
        try:
            for rel, info in sorted(files.items()):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{src}/{rel}", str(target))
                if target.stat().st_size != info.get("size"):
                    raise OSError(f"{rel}: got {target.stat().st_size} bytes, listed {info.get('size')}")
                kill_point("model_download")
            os.rename(tmp, dest)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception):
                raise ValueError(
                    f"engine.model: downloading {model} to {root} failed ({type(e).__name__}: {e}); check "
                    "the free space there (engine.cache_dir) and the URI"
                ) from e
            raise
        total = sum(int(i.get("size") or 0) for i in files.values())
        log.info("model: %s ready, %.1f MB in %.1fs", dest, total / 1e6, time.monotonic() - started)
    return dest, True
