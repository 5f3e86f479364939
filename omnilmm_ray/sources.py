"""Turn input URIs/globs into shards: the unit of reading, committing and resuming.

A `.tar` (WebDataset) or `.parquet` file is one shard; loose image files are grouped into shards of
`files_per_shard` as they are listed, one listing page or folder at a time, so planning never holds every
file of an input. Each shard carries the fingerprints of the files it covers, which nightly runs use to
skip what an earlier run already captioned; a plan stores a loose-file shard compactly, its file list in a
Parquet file of its own (`listing`, see listings.py).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.asyn import sync
from fsspec.utils import glob_translate

from omnilmm_ray.config import ConfigError, InputConfig
from omnilmm_ray.storage import fingerprint, read_whole, resolve, unstrip

# The format of a shard standing for one input file whose name is not valid UTF-8 (one error row).
INVALID_NAME = "invalid_name"
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
    # "files" only. `count`, `first`, `last`: how many members, the first and last key. A compact shard (the
    # form plans store) has no members in memory but a `listing`: the URI of the Parquet file holding them
    # (`load_listing`), read with `listing_options` (the output's storage options; never written to a plan).
    count: int = 0
    first: str = ""
    last: str = ""
    listing: str | None = None
    listing_options: dict | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        """Everything but `listing_options` (credentials never travel in a plan or in pipeline items: read
        tasks take them from the job's config, stages.read_shards)."""
        d = {**asdict(self), "members": list(self.members)}
        del d["listing_options"]
        d["sidecars"] = list(self.sidecars) if self.sidecars is not None else None
        return {**d, "retry": self.retry.to_dict() if self.retry else None}

    def plan_entry(self) -> dict:
        """to_dict without what a plan must not store (credentials) or need not (a compact shard's members)."""
        d = self.to_dict()
        drop = ("count", "first", "last", "listing") if self.format != "files" else ()
        drop += ("members", "fingerprints", "sidecars") if self.listing else ()
        return {k: v for k, v in d.items() if k not in drop}

    @classmethod
    def from_dict(cls, d: dict) -> Shard:
        r = d.get("retry")
        retry = Retry(frozenset(r["indices"]), r["start"]) if r else None
        side = d.get("sidecars")
        side = tuple(side) if side is not None else None
        members = tuple(d.get("members", ()))
        return cls(**{**d, "members": members, "retry": retry, "sidecars": side})

    @property
    def files(self) -> int:
        """Images of a "files" shard."""
        return self.count or len(self.members)

    def wants(self, i: int) -> bool:
        return self.retry is None or self.retry.wants(i)

    def expected(self, rows: int, failed: bool) -> list[int]:
        """Sample indices this shard's committed file must hold, given its end marker: `rows` samples passed,
        the last of them a shard-level error row when `failed` (always written, wanted or not)."""
        return [i for i in range(rows) if self.wants(i) or (failed and i == rows - 1)]


def escape_name(name: str) -> str:
    """A name as text that any encoder takes, losslessly: the bytes of a name that is not UTF-8 (tar and
    POSIX file names are bytes; Python carries the undecodable ones as lone surrogates, which Arrow, JSON
    writers and hashes refuse) are written as `\\xNN` escapes. A UTF-8 name is returned unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def ext_of(path: str) -> str:
    return posixpath.basename(path).rpartition(".")[2].lower() if "." in posixpath.basename(path) else ""


def _shard_id(label: str, identity: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[-40:]
    return f"{stem}-{hashlib.sha1(identity.encode()).hexdigest()[:12]}"


def _order(info: dict) -> str:
    """Sort key of a listing entry: a folder sorts as its name plus "/", so that walking folders in this
    order yields file paths in plain sorted order (the order of a flat object-store listing)."""
    name = info["name"].rstrip("/")
    return name + "/" if info["type"] == "directory" else name


async def _next_page(it, n: int = 1000) -> list[dict]:
    page = []
    async for info in it:
        page.append(info)
        if len(page) == n:
            break
    return page


def _pages(fs, path: str, flat: bool) -> Iterator[list[dict]]:
    """Listing pages of folder `path`, each sorted, in order: on S3 as the store pages them (`flat`: every
    object below, without folders: one request per 1,000 objects), elsewhere one folder at a time."""
    if hasattr(fs, "_iterdir") and hasattr(fs, "split_path"):  # s3fs: page by page, not one list of all
        bucket, key, _ = fs.split_path(path)
        it = fs._iterdir(bucket, delimiter="" if flat else "/", prefix=f"{key.rstrip('/')}/" if key else "")
        while page := sync(fs.loop, _next_page, it):
            yield sorted(page, key=_order)
        return
    try:
        page = fs.ls(path, detail=True)
    except FileNotFoundError:  # a glob's root that does not exist: it matches nothing
        return
    fs.invalidate_cache(path)  # fsspec caches every folder listed; a walk needs each once
    yield sorted(page, key=_order)


def _walk(fs, path: str, descend: Callable[[str], bool] | None) -> Iterator[tuple[str, dict]]:
    """(path, info) of the files below folder `path` in sorted order, holding one listing page or folder
    per level; `descend(folder)` says whether to enter a subfolder (None: every one)."""
    top = path.rstrip("/")
    for page in _pages(fs, top, flat=descend is None):
        for info in page:
            name = info["name"].rstrip("/")
            if info["type"] == "directory":
                if name != top and (descend is None or descend(name)):
                    yield from _walk(fs, name, descend)
            elif name != top and not info["name"].endswith("/"):  # S3 folder markers are no files
                yield name, info


def _glob_walk(fs, path: str) -> tuple[str, Iterator[tuple[str, dict]]]:
    """A glob: its root folder, and the files it matches or that lie in folders it matches."""
    root = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
    pattern = re.compile(glob_translate(path))
    depth = path.count("/")

    def matched(p: str) -> bool:  # p or a folder above it, below the root
        while len(p) > len(root):
            if pattern.match(p):
                return True
            p = p.rsplit("/", 1)[0]
        return False

    def descend(d: str) -> bool:
        return "**" in path or d.count("/") < depth or matched(d)

    return root, ((p, i) for p, i in _walk(fs, root, descend) if matched(p))


def iter_files(pattern: str, cfg: InputConfig) -> tuple[str, Iterator[tuple[str, dict]]]:
    """One input -> (root used for relative keys, (path, info) of every file it names, in sorted order)."""
    fs, path = resolve(pattern, cfg.storage_options)
    if any(c in path for c in "*?["):
        root, found = _glob_walk(fs, path)
    elif fs.isdir(path):
        root, found = path.rstrip("/"), _walk(fs, path, None)
    elif fs.exists(path):
        root, found = posixpath.dirname(path), iter([(path, fs.info(path))])
    else:
        root, found = "", iter(())
    return root, ((p, i) for p, i in found if not posixpath.basename(p).startswith("."))


def _with_sidecars(files: Iterator[tuple[str, dict]]) -> Iterator[tuple[str, dict, str]]:
    """(path, info, sidecar extensions) of the images and shard files among sorted `files`.

    All paths starting with `stem.` are consecutive in sorted order, so an image waits only until the listing
    has passed its stem's block, where every `stem.json` / `stem.txt` beside it has been seen."""
    waiting: list[tuple[str, dict, str]] = []  # (path, info, stem) in listing order
    sides: dict[str, list[str]] = {}  # stem -> sidecar extensions seen, for stems whose block is open

    def ready(now: str | None) -> Iterator[tuple[str, dict, str]]:
        while waiting and (now is None or not now.startswith(waiting[0][2] + ".")):
            p, i, stem = waiting.pop(0)
            yield p, i, ",".join(sorted(sides.get(stem, ())))
        for stem in [s for s in sides if now is None or not now.startswith(s + ".")]:
            if not any(w[2] == stem for w in waiting):
                del sides[stem]

    for path, info in files:
        yield from ready(path)
        ext, stem = ext_of(path), path.rpartition(".")[0]
        if ext in SIDECAR_EXTS:
            sides.setdefault(stem, []).append(ext)
        elif ext in IMAGE_EXTS or ext in ("tar", "parquet"):
            waiting.append((path, info, stem))
    yield from ready(None)


def files_shard(fs, root: str, group: list[tuple[str, dict, str]], number: int) -> Shard:
    keys = tuple(posixpath.relpath(p, root) for p, _, _ in group)
    fps = {unstrip(fs, p): fingerprint(info) for p, info, _ in group}
    sid = _shard_id(posixpath.basename(root) + f"-files{number:05d}", "\n".join(fps))
    size = sum(int(info.get("size") or 0) for _, info, _ in group)
    side = tuple(sc for *_, sc in group)
    return Shard(
        sid,
        "files",
        unstrip(fs, root),
        keys,
        fps,
        size,
        sidecars=side,
        count=len(keys),
        first=keys[0],
        last=keys[-1],
    )


def iter_shards(inputs: list[str], cfg: InputConfig) -> Iterator[Shard]:
    """Expand inputs into shards, deduplicated, in a stable order, as they are listed: at most one shard
    of loose files (`files_per_shard`) is held here at a time."""
    seen: set[str] = set()

    def new(s: Shard) -> bool:
        fresh = s.shard_id not in seen
        seen.add(s.shard_id)
        return fresh

    for pattern in inputs:
        fs, _ = resolve(pattern, cfg.storage_options)
        root, files = iter_files(pattern, cfg)
        listed = [0]

        def counted(files=files, listed=listed):
            for f in files:
                listed[0] += 1
                yield f

        group: list[tuple[str, dict, str]] = []
        number = recognised = 0
        for path, info, side in _with_sidecars(counted()):
            uri, ext = unstrip(fs, path), ext_of(path)
            recognised += 1
            if (escaped := escape_name(uri)) != uri:
                # A name that is not UTF-8 cannot be a key, a source or a plan entry: it becomes a shard of
                # its own whose one row says so (readers.py), and the other files are read as usual.
                key = escape_name(posixpath.relpath(path, root)) if root else escape_name(path)
                s = Shard(
                    _shard_id("invalid_name", escaped),
                    INVALID_NAME,
                    escaped,
                    (key,),
                    {escaped: fingerprint(info)},
                )
                if new(s):
                    yield s
                continue
            if ext in ("tar", "parquet"):
                size = int(info.get("size") or 0)
                if new(
                    s := Shard(
                        _shard_id(posixpath.basename(path), uri), ext, uri, (), {uri: fingerprint(info)}, size
                    )
                ):
                    yield s
                continue
            group.append((path, info, side))
            if len(group) == cfg.files_per_shard:
                if new(s := files_shard(fs, root, group, number)):
                    yield s
                group, number = [], number + 1
        if group and new(s := files_shard(fs, root, group, number)):
            yield s
        if not listed[0]:
            raise ConfigError(f"inputs: {pattern!r} matches no file; check the URI, glob and credentials")
        if not recognised:
            raise ConfigError(
                f"inputs: {pattern!r} matches files but none is a .tar, .parquet or image "
                f"({', '.join(sorted(IMAGE_EXTS))})"
            )


def plan_shards(inputs: list[str], cfg: InputConfig) -> list[Shard]:
    """Every shard of `iter_shards`, as a list (small inputs, tests)."""
    return list(iter_shards(inputs, cfg))


LISTING_SCHEMA = pa.schema([("key", pa.string()), ("fingerprint", pa.string()), ("sidecars", pa.string())])


def listing_bytes(shard: Shard) -> bytes:
    """A loose-file shard's members, fingerprints and sidecars as one small Parquet file."""
    t = pa.table(
        [list(shard.members), list(shard.fingerprints.values()), list(shard.sidecars or ("",) * shard.files)],
        schema=LISTING_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(t, buf, compression="zstd")
    return buf.getvalue()


def load_listing(shard: Shard) -> Shard:
    """A compact shard with its members, fingerprints and sidecars read from its listing (one GET)."""
    if not shard.listing or shard.members:
        return shard
    fs, path = resolve(shard.listing, shard.listing_options)
    t = pq.read_table(io.BytesIO(read_whole(fs, path))).to_pydict()
    base = shard.uri.rstrip("/")
    fps = {f"{base}/{k}": fp for k, fp in zip(t["key"], t["fingerprint"])}
    return replace(shard, members=tuple(t["key"]), fingerprints=fps, sidecars=tuple(t["sidecars"]))


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
                    count=len(keep),
                    first=keep[0][0],
                    last=keep[-1][0],
                )
            )
    return out
