"""The output table: one `run=<id>/` partition per run, each sealed by `_SUCCESS`.

    OUTPUT/_lock.json                     lease held by the running job
    OUTPUT/run=<id>/_plan.json            shards this run covers (+ settings fingerprint)
    OUTPUT/_files/<digest>.listing        the files of one loose-file shard of a plan (listings.py)
    OUTPUT/_inputs/<id>.listing           every file a run's planning listed (present.py)
    OUTPUT/run=<id>/<shard_id>.parquet    one file per shard, written once, atomically
    OUTPUT/run=<id>/_summary.json, _SUCCESS

Readers use committed runs only (`committed_files`, `read_latest`). A rerun resumes the newest unsealed
run; otherwise it starts a new run over the inputs that no sealed run covered yet, plus the rows whose
newest state is an error of a kind `sink.retry_errors` names (read again, only those).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from omnilmm_ray import schema
from omnilmm_ray.commit import remove_files, shard_file
from omnilmm_ray.config import (
    ConfigError,
    JobConfig,
    fingerprint_diff,
    fingerprint_prompts,
    generation_fingerprint,
    reuse_settings,
)
from omnilmm_ray.listings import CoveredFiles, ListingWriter, key_range
from omnilmm_ray.present import PresentWriter
from omnilmm_ray.reuse import ReuseIndex, open_index
from omnilmm_ray.schema import SHARD_KINDS
from omnilmm_ray.sources import Retry, Shard, iter_shards, load_listing
from omnilmm_ray.storage import join, open_atomic, read_json, resolve, temp_files, write_json

log = logging.getLogger(__name__)
ABANDONED = "_ABANDONED.json"

PROBE = "_probe-"  # the name of checks.check_output's write test


@dataclass
class Run:
    run_id: str
    uri: str
    shards: list[Shard]
    resumed: bool
    plan: dict | None = None  # a new run's plan, until written (OutputTable.write_plan)
    abandons: str | None = None  # an unsealed run with other settings this one replaces (write_plan)


class OutputTable:
    def __init__(self, uri: str, storage_options: dict | None = None):
        # A relative local path is made absolute: Ray workers do not run in the driver's directory, and they
        # read files under the output (a compact shard's listing, the crash drill's marker).
        self.uri = (uri if "://" in uri else os.path.abspath(uri)).rstrip("/")
        self.opts = storage_options or {}
        self.fs, self.path = resolve(self.uri, self.opts)

    def run_uri(self, run_id: str) -> str:
        return join(self.uri, f"run={run_id}")

    def run_ids(self) -> list[str]:
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n.rsplit("/", 1)[-1][4:] for n in names if n.rsplit("/", 1)[-1].startswith("run="))

    def remove_leftovers(self) -> list[str]:
        """Remove what kills left, and return it: temporary files of interrupted local writes at any depth
        (a `run=*/**/*.parquet` glob would read them), a precheck's probe, and `run=` folders holding
        nothing else and no plan (a kill inside a run's first write: no run). Only the lease holder may
        call it: no other job writes here then, but another one's precheck (its probe: a plain write,
        whose removal it tolerates) and lease takeover (whose temporary files lease.py removes under
        its lock, so they are left alone here)."""
        gone = [
            p
            for p in temp_files(self.fs, self.path)
            if not (os.path.dirname(p) == self.path and p.endswith("-_lock.json"))
        ]
        gone += [p for p in self.fs.ls(self.path, detail=False) if p.rsplit("/", 1)[-1].startswith(PROBE)]
        remove_files(self.fs, gone)
        for rid in self.run_ids() if isinstance(self.fs, LocalFileSystem) else ():
            path = self._run_path(rid)
            if self.fs.exists(join(path, "_plan.json")):
                continue
            if not os.listdir(path):
                os.rmdir(path)
                gone.append(path)
            else:  # not ours to delete: written by something other than this job
                log.warning("%s has no _plan.json, so it is no run: reruns and reports ignore it", path)
        return gone

    def _run_path(self, run_id: str) -> str:
        return join(self.path, f"run={run_id}")

    def is_sealed(self, run_id: str) -> bool:
        return self.fs.exists(join(self._run_path(run_id), "_SUCCESS"))

    def plan_of(self, run_id: str) -> dict | None:
        return read_json(self.fs, join(self._run_path(run_id), "_plan.json"))

    def sealed_runs(self) -> list[str]:
        return [r for r in self.run_ids() if self.is_sealed(r)]

    def shard(self, d: dict) -> Shard:
        """A shard of a plan; a compact one reads its listing with the output's storage options."""
        s = Shard.from_dict(d)
        return replace(s, listing_options=self.opts) if s.listing else s

    def open_run(self, cfg: JobConfig, write: bool = True, listings: bool = True) -> Run:
        """Resume the newest unsealed run, or plan a new one over what no sealed run covered.

        `write=False` leaves a new run's plan unwritten (`write_plan`): the job writes it once an engine
        serves the model, so a job that fails before leaves no run behind. `listings=False` (a dry run)
        writes no listing of loose-file shards either.
        """
        fp = generation_fingerprint(cfg)
        ids = self.run_ids()
        plans = {rid: self.plan_of(rid) for rid in ids}  # each read once: these are object-store GETs
        sealed = [rid for rid in ids if self.is_sealed(rid)]
        for rid, plan in plans.items():
            if plan and fingerprint_prompts(plan["fingerprint"]) != fingerprint_prompts(fp):
                raise ConfigError(
                    f"output: {self.uri} holds run {rid} with other prompt names (earlier run -> this job: "
                    f"{fingerprint_diff(plan['fingerprint'], fp)}); the prompt names are the table's columns: "
                    "keep them (a prompt's text, the model and generation settings may change), or write "
                    "to a new --output"
                )
        abandoned = None
        if ids and ids[-1] not in sealed and plans[ids[-1]] is not None:
            if plans[ids[-1]]["fingerprint"] == fp:
                shards = [self.shard(s) for s in plans[ids[-1]]["shards"]]
                return Run(ids[-1], self.run_uri(ids[-1]), shards, True)
            # The settings changed while a run was unfinished (e.g. a prompt typo stopped it): it will never
            # be sealed, and this new run plans every image again with the new settings.
            abandoned = ids[-1]
            log.warning(
                "run %s was not finished and used other settings (%s): a new run replaces it",
                abandoned,
                fingerprint_diff(plans[abandoned]["fingerprint"], fp),
            )
        # Only the sealed runs made with these settings since they were last changed count as done: after a
        # change, every image present is planned again (reuse serves the pairs captioned before, any run).
        other = [i for i, rid in enumerate(sealed) if plans[rid]["fingerprint"] != fp]
        sealed = sealed[other[-1] + 1 :] if other else sealed
        done: dict[str, str] = {}  # tar/Parquet shard URI -> fingerprint: one per shard
        loose: list[list[Shard]] = []
        for rid in sealed:
            loose.append([])
            for d in plans[rid]["shards"]:
                if d["format"] == "files":
                    loose[-1].append(self.shard(d))
                else:
                    done.update(d["fingerprints"])
        covered = CoveredFiles(loose)
        del loose
        retry, redo_files = self._failed_rows(sealed, plans, cfg.sink.retry_kinds())
        shards = []
        rid = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        present = PresentWriter(self.uri, rid, self.opts, write=listings)  # what is gone: snapshot.py
        with ListingWriter(self.uri, self.opts, write=listings) as listing, present:
            for s in iter_shards(cfg.inputs, cfg.input):
                present.add(s)
                if s.format == "files":
                    # a loose file is one image: reading a failed one again whole redoes just its row
                    if (part := covered.new_part(s, redo_files)) is not None:
                        shards.append(listing.compact(part))
                elif any(done.get(u) != f for u, f in s.fingerprints.items()):
                    shards.append(s)
                elif s.uri in retry:  # unchanged, with failed rows: only those rows
                    shards.append(replace(s, retry=retry[s.uri]))
        plan = {
            "run_id": rid,
            "fingerprint": fp,
            "inputs": cfg.inputs,
            "present": present.uri,
            "shards": [s.plan_entry() for s in shards],
        }
        run = Run(rid, self.run_uri(rid), shards, False, plan, abandons=abandoned)
        if write:
            self.write_plan(run)
        return run

    def write_plan(self, run: Run) -> None:
        if run.plan is not None:
            write_json(self.fs, join(self._run_path(run.run_id), "_plan.json"), run.plan)
            run.plan = None
        if run.abandons is not None:  # after the plan: a crash in between resumes this run, which rewrites it
            marker = {"by": run.run_id, "reason": "settings changed before it was sealed"}
            write_json(self.fs, join(self._run_path(run.abandons), ABANDONED), marker)
            run.abandons = None

    def abandoned(self, run_id: str) -> dict | None:
        """Why an unsealed run will never be sealed (a later run with other settings replaced it), or None."""
        return read_json(self.fs, join(self._run_path(run_id), ABANDONED))

    def _error_rows(self, rid: str, plan: dict, kinds: set[str]) -> dict[str, list[tuple[int, str]]]:
        """Shard id -> (sample_index, kind) of a sealed run's rows with an error of `kinds`."""
        summary = read_json(self.fs, join(self._run_path(rid), "_summary.json")) or {}
        if "errors_by_kind" in summary and not kinds & set(summary["errors_by_kind"]):
            return {}  # one GET instead of reading every shard file of a run without such errors
        out = {}
        for s in plan["shards"]:
            with self.fs.open(shard_file(self._run_path(rid), s["shard_id"]), "rb") as f:
                t = pq.read_table(f, columns=["sample_index", "error_kind"])
            t = t.filter(pc.is_in(t.column("error_kind"), pa.array(sorted(kinds), pa.string())))
            if len(t):
                out[s["shard_id"]] = list(zip(*t.to_pydict().values()))
        return out

    def _failed_rows(
        self, sealed: list[str], plans: dict, kinds: set[str]
    ) -> tuple[dict[str, Retry], set[str]]:
        """Rows of sealed runs whose newest state is an error of `kinds`: tar/Parquet shard URI -> the part
        to read again, and the URIs of loose files to read again.

        Runs are replayed oldest first: a whole read of a shard replaces what earlier runs left, a retry
        covers the indices it wanted; then the run's own failed rows are added. A later run that reads a
        changed file whole plans it from its fingerprint, so retries only ever concern unchanged files.
        """
        if not kinds:
            return {}, set()
        pending: dict[str, tuple[set[int], int | None]] = {}
        files: set[str] = set()
        for rid in sealed:
            errors = self._error_rows(rid, plans[rid], kinds)
            for d in plans[rid]["shards"]:
                s = self.shard(d)
                failed = errors.get(s.shard_id, [])
                if s.format == "files":  # each file read whole; a shard-level error stands for those after it
                    first, last = key_range(s)
                    if not failed and not any(first <= u <= last for u in files):
                        continue  # nothing to add or replace: its listing is not read
                    uris = list(load_listing(s).fingerprints)
                    files.difference_update(uris)
                    for i, kind in failed:
                        files.update(uris[i:] if kind in SHARD_KINDS else uris[i : i + 1])
                    continue
                indices, start = pending.get(s.uri, (set(), None))
                indices = {i for i in indices if not s.wants(i)}
                if start is not None and (s.retry is None or s.wants(start) and s.retry.start is not None):
                    start = None  # read again from `start` on (a retry of single indices stops after them)
                for i, kind in failed:
                    if kind in SHARD_KINDS:
                        start = i if start is None else min(start, i)
                    else:
                        indices.add(i)
                pending[s.uri] = (indices, start)
        return {
            uri: Retry(frozenset(i for i in indices if start is None or i < start), start)
            for uri, (indices, start) in pending.items()
            if indices or start is not None
        }, files

    def _sealed_files(self) -> dict[str, list[str]]:
        """Sealed run id -> its shard files."""
        return {
            rid: [shard_file(self._run_path(rid), s["shard_id"]) for s in self.plan_of(rid)["shards"]]
            for rid in self.sealed_runs()
        }

    def committed_files(self) -> list[str]:
        return [f for files in self._sealed_files().values() for f in files]

    def output_schema(self) -> pa.Schema:
        """This output's columns (with the per-prompt ones of a multi-prompt output): an output holds one
        labelling configuration, so any run's plan tells."""
        for rid in reversed(self.run_ids()):
            if plan := self.plan_of(rid):
                return schema.output_schema(list(plan["fingerprint"].get("prompts") or []))
        return schema.OUTPUT_SCHEMA

    def read_latest(self) -> pa.Table:
        """The newest caption per image across sealed runs, with a `run` column (see iter_latest)."""
        empty = self.output_schema().append(pa.field("run", pa.string())).empty_table()
        return pa.concat_tables([empty, *self.iter_latest()])

    def iter_latest(self) -> Iterator[pa.Table]:
        """The newest row per image across sealed runs, one table per input shard (its files in every sealed
        run), so memory holds one shard's history at a time. Loose files are grouped per folder.

        A tar or Parquet shard's images are its samples in order, and keys may repeat inside one, so an
        image is (source, sample_index) of one reading of the file: the newest run that read the shard whole
        replaces every earlier row (an image gone from a rewritten file goes with them), and later retries
        of single rows of the same file replace theirs. A loose file is its own source, one image per key.

        A shard-level error row (no key: reading stopped there) is dropped once a later run read that shard
        again from its index on. (For loose files its source is their folder, and any later read of files in
        that folder drops it; the files themselves stay planned for a retry until read.)
        """
        columns = self.output_schema()
        groups: dict[str, list[tuple[str, Shard]]] = {}
        for rid in self.sealed_runs():
            for d in self.plan_of(rid)["shards"]:
                groups.setdefault(d["uri"], []).append((rid, self.shard(d)))
        for reread in groups.values():
            if reread[0][1].format != "files":  # runs are in id order: keep the newest whole read on
                whole = [i for i, (_, s) in enumerate(reread) if s.retry is None]
                reread = reread[whole[-1] :] if whole else reread
            parts = []
            for rid, s in reread:
                with self.fs.open(shard_file(self._run_path(rid), s.shard_id), "rb") as f:
                    t = pq.read_table(f).replace_schema_metadata(None).cast(columns)
                parts.append(t.append_column("run", pa.array([rid] * len(t), pa.string())))
            t = pa.concat_tables(parts)
            keyless = t.filter(pc.is_null(t.column("key")))
            if len(keyless):  # few: one per shard that failed midway
                keep = [
                    not any(r2 > run and s.wants(i) for r2, s in reread)
                    for i, run in zip(*keyless.select(["sample_index", "run"]).to_pydict().values())
                ]
                keyless = keyless.filter(pa.array(keep, pa.bool_()))
            identity = ["source", "key"] if reread[0][1].format == "files" else ["source", "sample_index"]
            t = t.filter(pc.is_valid(t.column("key"))).sort_by([("run", "descending")])
            t = t.append_column("_i", pa.array(np.arange(len(t))))
            first = t.group_by(identity, use_threads=False).aggregate([("_i", "first")])
            t = t.take(np.sort(first.column("_i_first").to_numpy())).drop_columns(["_i"])
            yield pa.concat_tables([t, keyless]).sort_by(
                [("source", "ascending"), ("sample_index", "ascending")]
            )

    def reuse_index(self, cfg: JobConfig | None = None) -> ReuseIndex | None:
        """Captions of sealed runs by (sha256, rendered prompt), or None when there are none; with `cfg`, only
        of the runs whose other settings (model, generation, ...) are this job's, in any earlier run. Indexes
        missing from runs sealed before they existed are built here, once."""
        runs = self.sealed_runs()
        if cfg is not None:
            want = reuse_settings(generation_fingerprint(cfg))
            runs = [r for r in runs if reuse_settings(self.plan_of(r)["fingerprint"]) == want]
        return open_index(self.uri, runs, self.plan_of, self.opts)


def latest_to_parquet(output_uri: str, dest_uri: str, storage_options: dict | None = None) -> int:
    """Write `read_latest()` of an output table to one Parquet file; returns its row count."""
    fs, path = resolve(dest_uri, storage_options)
    table = OutputTable(output_uri, storage_options)
    columns = table.output_schema().append(pa.field("run", pa.string()))
    n = 0
    with open_atomic(fs, path) as f, pq.ParquetWriter(f, columns, compression="zstd") as w:
        for t in table.iter_latest():
            w.write_table(t)
            n += len(t)
    return n
