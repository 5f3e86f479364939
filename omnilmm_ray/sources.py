"""Turn input URIs/globs into shards: the unit of reading, committing and resuming.

A `.tar` (WebDataset) or `.parquet` file is one shard; loose image files are grouped into shards of
`files_per_shard`. Each shard carries the fingerprints of the files it covers, which nightly runs use to
skip what an earlier run already captioned.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import asdict, dataclass, field

from omnilmm_ray.config import ConfigError, InputConfig
from omnilmm_ray.storage import fingerprint, resolve, unstrip

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"}
SIDECAR_EXTS = {"json", "txt"}


@dataclass(frozen=True)
class Retry:
    """The part of a shard a later run reads again: these sample indices, and every index from `start` on.

    `start` comes from a shard-level failure (reading stopped there, so how many samples follow is unknown).
    """

    indices: frozenset[int] = frozenset()
    start: int | None = None

    def wants(self, i: int) -> bool:
        return i in self.indices or (self.start is not None and i >= self.start)

    def last(self) -> int | None:
        """The last index wanted, or None when all from `start` on are."""
        return None if self.start is not None else max(self.indices, default=-1)

    def to_dict(self) -> dict:
        return {"indices": sorted(self.indices), "start": self.start}


@dataclass(frozen=True)
class Shard:
    shard_id: str
    format: str  # "tar" | "parquet" | "files"
    uri: str  # the shard file; for "files", the folder the keys are relative to
    members: tuple[str, ...] = ()  # "files" only: keys (paths relative to `uri`)
    fingerprints: dict[str, str] = field(default_factory=dict)  # file URI -> fingerprint
    size: int = 0
    retry: Retry | None = None  # None: the whole shard; else only the rows an earlier run left failed
    # "files" only, one per member: its sidecar extensions found in the listing ("json,txt", "txt", ""), so the
    # reader fetches sidecars that exist instead of probing for them; None (plans made before): probe.
    sidecars: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        d = {**asdict(self), "members": list(self.members)}
        d["sidecars"] = list(self.sidecars) if self.sidecars is not None else None
        return {**d, "retry": self.retry.to_dict() if self.retry else None}

    @classmethod
    def from_dict(cls, d: dict) -> Shard:
        r = d.get("retry")
        retry = Retry(frozenset(r["indices"]), r["start"]) if r else None
        side = d.get("sidecars")
        side = tuple(side) if side is not None else None
        return cls(**{**d, "members": tuple(d["members"]), "retry": retry, "sidecars": side})

    def wants(self, i: int) -> bool:
        return self.retry is None or self.retry.wants(i)

    def expected(self, rows: int, failed: bool) -> list[int]:
        """Sample indices this shard's committed file must hold, given its end marker: `rows` samples passed,
        the last of them a shard-level error row when `failed` (always written, wanted or not)."""
        return [i for i in range(rows) if self.wants(i) or (failed and i == rows - 1)]


def ext_of(path: str) -> str:
    return posixpath.basename(path).rpartition(".")[2].lower() if "." in posixpath.basename(path) else ""


def _shard_id(label: str, identity: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[-40:]
    return f"{stem}-{hashlib.sha1(identity.encode()).hexdigest()[:12]}"


def _expand_one(pattern: str, cfg: InputConfig) -> tuple[str, dict[str, dict]]:
    """One input -> (root used for relative keys, {path: info}) of every file it names."""
    fs, path = resolve(pattern, cfg.storage_options)
    if any(c in path for c in "*?["):
        root = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
        found = {}
        for p, i in fs.glob(path, detail=True).items():  # a glob may match folders: take all they hold
            found.update(fs.find(p, detail=True) if i.get("type") == "directory" else {p: i})
    elif fs.isdir(path):
        root, found = path.rstrip("/"), fs.find(path, detail=True)
    elif fs.exists(path):
        root, found = posixpath.dirname(path), {path: fs.info(path)}
    else:
        found = {}
    if not found:
        raise ConfigError(f"inputs: {pattern!r} matches no file; check the URI, glob and credentials")
    return root, {p: i for p, i in found.items() if not posixpath.basename(p).startswith(".")}


def plan_shards(inputs: list[str], cfg: InputConfig) -> list[Shard]:
    """Expand inputs into shards, deduplicated, in a stable order."""
    shards: dict[str, Shard] = {}
    for pattern in inputs:
        fs, _ = resolve(pattern, cfg.storage_options)
        root, files = _expand_one(pattern, cfg)
        loose: list[tuple[str, dict]] = []
        sides: dict[str, list[str]] = {}  # path without extension -> sidecar extensions listed beside it
        recognised = 0
        for path, info in sorted(files.items()):
            uri, ext = unstrip(fs, path), ext_of(path)
            if ext in ("tar", "parquet"):
                sid = _shard_id(posixpath.basename(path), uri)
                shards[sid] = Shard(sid, ext, uri, (), {uri: fingerprint(info)}, int(info.get("size") or 0))
                recognised += 1
            elif ext in IMAGE_EXTS:
                loose.append((path, info))
            elif ext in SIDECAR_EXTS:
                sides.setdefault(path.rpartition(".")[0], []).append(ext)
        del files
        for i in range(0, len(loose), cfg.files_per_shard):
            group = loose[i : i + cfg.files_per_shard]
            keys = tuple(posixpath.relpath(p, root) for p, _ in group)
            fps = {unstrip(fs, p): fingerprint(info) for p, info in group}
            sid = _shard_id(
                posixpath.basename(root) + f"-files{i // cfg.files_per_shard:05d}", "\n".join(fps)
            )
            size = sum(int(info.get("size") or 0) for _, info in group)
            side = tuple(",".join(sorted(sides.get(p.rpartition(".")[0], ()))) for p, _ in group)
            shards[sid] = Shard(sid, "files", unstrip(fs, root), keys, fps, size, sidecars=side)
        if not recognised and not loose:
            raise ConfigError(
                f"inputs: {pattern!r} matches files but none is a .tar, .parquet or image "
                f"({', '.join(sorted(IMAGE_EXTS))})"
            )
    return list(shards.values())


def without_done(shards: list[Shard], done: dict[str, str]) -> list[Shard]:
    """Drop files whose fingerprint an earlier committed run already covered (file URI -> fingerprint)."""
    out = []
    for s in shards:
        if s.format != "files":
            if any(done.get(u) != fp for u, fp in s.fingerprints.items()):
                out.append(s)
            continue
        side = s.sidecars if s.sidecars is not None else ("",) * len(s.members)
        keep = [
            (k, u, sc)
            for k, u, sc in zip(s.members, s.fingerprints, side)
            if done.get(u) != s.fingerprints[u]
        ]
        if len(keep) == len(s.members):
            out.append(s)
        elif keep:
            fps = {u: s.fingerprints[u] for _, u, _ in keep}
            out.append(
                Shard(
                    _shard_id(s.shard_id.rsplit("-", 1)[0], "\n".join(fps)),
                    "files",
                    s.uri,
                    tuple(k for k, _, _ in keep),
                    fps,
                    s.size,
                    sidecars=tuple(sc for *_, sc in keep) if s.sidecars is not None else None,
                )
            )
    return out
