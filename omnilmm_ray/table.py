"""The output table: one `run=<id>/` partition per run, each sealed by `_SUCCESS`.

    OUTPUT/_lock.json                     lease held by the running job
    OUTPUT/run=<id>/_plan.json            shards this run covers (+ settings fingerprint)
    OUTPUT/run=<id>/<shard_id>.parquet    one file per shard, written once, atomically
    OUTPUT/run=<id>/_summary.json, _SUCCESS

Readers use committed runs only (`committed_files`, `read_latest`). A rerun resumes the newest unsealed
run; otherwise it starts a new run over the inputs that no sealed run covered yet.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from omnilmm_ray.commit import shard_file
from omnilmm_ray.config import ConfigError, JobConfig, generation_fingerprint
from omnilmm_ray.sources import Shard, plan_shards, without_done
from omnilmm_ray.storage import join, read_json, resolve, write_json

log = logging.getLogger(__name__)


@dataclass
class Run:
    run_id: str
    uri: str
    shards: list[Shard]
    resumed: bool


class OutputTable:
    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri.rstrip("/")
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

    def _run_path(self, run_id: str) -> str:
        return join(self.path, f"run={run_id}")

    def is_sealed(self, run_id: str) -> bool:
        return self.fs.exists(join(self._run_path(run_id), "_SUCCESS"))

    def plan_of(self, run_id: str) -> dict | None:
        return read_json(self.fs, join(self._run_path(run_id), "_plan.json"))

    def sealed_runs(self) -> list[str]:
        return [r for r in self.run_ids() if self.is_sealed(r)]

    def open_run(self, cfg: JobConfig, write: bool = True, before_write=None) -> Run:
        """Resume the newest unsealed run, or plan a new one over what no sealed run covered.

        `before_write` runs after planning (listing inputs) and before the plan is written, so a check that
        may fail (the engine preflight) overlaps the listing yet leaves no run behind when it fails.
        """
        fp = generation_fingerprint(cfg)
        ids = self.run_ids()
        plans = {rid: self.plan_of(rid) for rid in ids}  # each read once: these are object-store GETs
        sealed = [rid for rid in ids if self.is_sealed(rid)]
        for rid, plan in plans.items():
            if plan and plan["fingerprint"] != fp:
                raise ConfigError(
                    f"output: {self.uri} holds run {rid} made with other settings ({plan['fingerprint']}); "
                    "captions with different model/prompt/generation settings go to a new --output"
                )
        if ids and ids[-1] not in sealed and plans[ids[-1]] is not None:
            if before_write:
                before_write()
            shards = [Shard.from_dict(s) for s in plans[ids[-1]]["shards"]]
            return Run(ids[-1], self.run_uri(ids[-1]), shards, True)
        done: dict[str, str] = {}
        for rid in sealed:
            for s in plans[rid]["shards"]:
                done.update(s["fingerprints"])
        shards = without_done(plan_shards(cfg.inputs, cfg.input), done)
        rid = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        run = Run(rid, self.run_uri(rid), shards, False)
        if before_write:
            before_write()
        if write:
            write_json(
                self.fs,
                join(self._run_path(rid), "_plan.json"),
                {
                    "run_id": rid,
                    "fingerprint": fp,
                    "inputs": cfg.inputs,
                    "shards": [s.to_dict() for s in shards],
                },
            )
        return run

    def _sealed_files(self) -> dict[str, list[str]]:
        """Sealed run id -> its shard files."""
        return {
            rid: [shard_file(self._run_path(rid), s["shard_id"]) for s in self.plan_of(rid)["shards"]]
            for rid in self.sealed_runs()
        }

    def committed_files(self) -> list[str]:
        return [f for files in self._sealed_files().values() for f in files]

    def read_committed(self, columns: list[str] | None = None) -> pa.Table:
        """All rows of sealed runs, with a `run` column."""
        parts = []
        for rid, files in self._sealed_files().items():
            if files:
                t = pads.dataset(files, filesystem=self.fs, format="parquet").to_table(columns=columns)
                parts.append(t.append_column("run", pa.array([rid] * len(t), pa.string())))
        return pa.concat_tables(parts) if parts else pa.table({})

    def read_latest(self) -> pa.Table:
        """The newest caption per (source, key) across sealed runs."""
        t = self.read_committed()
        if not len(t):
            return t
        t = t.sort_by([("run", "descending")])
        keys = [f"{s}\x00{k}" for s, k in zip(t.column("source").to_pylist(), t.column("key").to_pylist())]
        seen, keep = set(), []
        for k in keys:
            keep.append(k not in seen)
            seen.add(k)
        return t.filter(pa.array(keep))

    def reuse_cache(self, cfg: JobConfig) -> dict[str, dict]:
        """sha256 -> caption fields of successful rows in sealed runs (same settings: see open_run)."""
        t = self.read_committed(
            ["sha256", "caption", "input_tokens", "output_tokens", "finish_reason", "error"]
        )
        if not len(t):
            return {}
        t = t.filter(pc.and_(pc.is_null(t.column("error")), pc.is_valid(t.column("sha256"))))
        out = {}
        for r in t.select(
            ["sha256", "caption", "input_tokens", "output_tokens", "finish_reason"]
        ).to_pylist():
            sha = r.pop("sha256")
            out[sha] = {
                "text": r["caption"],
                **{k: r[k] for k in ("input_tokens", "output_tokens", "finish_reason")},
            }
        return out


def latest_to_parquet(output_uri: str, dest_uri: str, storage_options: dict | None = None) -> int:
    """Write `read_latest()` of an output table to one Parquet file; returns its row count."""
    from omnilmm_ray.storage import write_parquet_atomic

    t = OutputTable(output_uri, storage_options).read_latest()
    fs, path = resolve(dest_uri, storage_options)
    write_parquet_atomic(fs, path, t)
    return t.num_rows
