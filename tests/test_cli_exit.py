"""The exit contract: every non-zero exit of `omnilmm-caption` (and its subcommands) ends with a last line
ending in ` [exit N]`, because `ray job submit` reports every failure as exit 1 and a submitter reads the job's
code from there; `--help` names the command and its subcommands.

Failures before Ray starts run in a subprocess (the console script's own call: `sys.exit(main())`);
failures that need a fault injected run in-process.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from omnilmm_ray import cli
from omnilmm_ray.samples import build_samples
from tests.conftest import ROOT
from tests.test_cli_errors import FAST_AWS

EXIT = re.compile(r" \[exit (\d+)\]$")
# What `pip install` puts on the PATH as omnilmm-caption runs exactly this.
CONSOLE_SCRIPT = "import sys; from omnilmm_ray.cli import main; sys.exit(main())"


def run(args, script=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local", **FAST_AWS}
    cmd = [sys.executable, script] if script else [sys.executable, "-c", CONSOLE_SCRIPT]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=120)


def last_line(r) -> str:
    """The last line of the job's log, stdout and stderr together (stderr is written last on failure)."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return (r.stdout + r.stderr).strip().splitlines()[-1]


def code_in(line: str) -> int:
    m = EXIT.search(line)
    assert m, f"no ' [exit N]' at the end of {line!r}"
    return int(m.group(1))


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    build_samples(root, shards=1, per_shard=4)
    return root


def test_input_matching_nothing_ends_with_exit_2(samples, tmp_path):
    r = run(["--input", str(tmp_path / "nothing-*.tar"), "--output", str(tmp_path / "out"), "--dry-run"])
    line = last_line(r)
    assert r.returncode == 2 == code_in(line)
    assert line.startswith("error: inputs: ") and "matches no file" in line


def test_usage_error_ends_with_exit_2_and_names_the_help():
    r = run(["--batch-size", "many"])
    line = last_line(r)
    assert r.returncode == 2 == code_in(line)
    assert line.startswith("error: argument --batch-size: invalid int value: 'many'")
    assert "see omnilmm-caption --help" in line
    r = run(["report", "--output"])  # a subcommand's own usage error
    assert r.returncode == 2 == code_in(last_line(r)) and "omnilmm-caption report --help" in last_line(r)


def test_locked_output_ends_with_exit_4(samples, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = {"owner": "x", "host": "other-host", "pid": 1, "heartbeat": time.time()}
    (out / "_lock.json").write_text(json.dumps(lock))
    r = run(["--input", str(samples / "webdataset"), "--output", str(out), "--engine", "fake"])
    line = last_line(r)
    assert r.returncode == 4 == code_in(line) and "output is in use" in line


def test_report_and_latest_subcommands_on_an_output_without_runs(tmp_path):
    r = run(["report", "--output", str(tmp_path / "none")])
    line = last_line(r)
    assert r.returncode == 2 == code_in(line) and line.startswith("error: output: no run in ")

    dest = tmp_path / "latest.parquet"
    for r in (  # the subcommand, and the checkout's script, which stays
        run(["latest", "--output", str(tmp_path / "none"), "--to", str(dest)]),
        run(["--output", str(tmp_path / "none"), "--to", str(dest)], script=str(ROOT / "jobs" / "latest.py")),
    ):
        line = last_line(r)
        assert r.returncode == 2 == code_in(line) and line.startswith("error: output: no sealed run in ")
    assert not dest.exists()


def test_help_names_the_command_and_lists_its_subcommands():
    r = run(["--help"])
    assert r.returncode == 0 and not r.stderr
    assert r.stdout.startswith("usage: omnilmm-caption ")
    for sub in ("report", "latest"):
        assert re.search(rf"^  {sub} ", r.stdout, re.M), r.stdout
    r = run(["latest", "--help"])
    assert r.returncode == 0 and r.stdout.startswith("usage: omnilmm-caption latest ") and "--to" in r.stdout


def test_unexpected_error_ends_with_exit_1(monkeypatch, tmp_path, capsys):
    import omnilmm_ray.report

    def boom(*a, **k):
        raise RuntimeError("summary unreadable\nsecond line")

    monkeypatch.setattr(omnilmm_ray.report, "history", boom)
    assert cli.main(["report", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err  # for the logs, before the last line
    assert err.strip().splitlines()[-1] == "error: RuntimeError: summary unreadable [exit 1]"


@pytest.mark.parametrize(
    "raised, line, code",
    [
        (KeyboardInterrupt(), "interrupted; rerun the same command", 130),
        (cli.Interrupted(signal.SIGTERM), "interrupted; rerun the same command", 143),
    ],
)
def test_interrupted_subcommand_ends_with_its_code(monkeypatch, tmp_path, capsys, raised, line, code):
    import omnilmm_ray.report

    def stop(*a, **k):
        raise raised

    monkeypatch.setattr(omnilmm_ray.report, "history", stop)
    try:
        rc = cli.main(["report", "--output", str(tmp_path)])
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped the command without its last line")
    assert rc == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"{line} [exit {code}]"


def test_sigterm_while_ray_starts_is_an_interrupt(monkeypatch, samples, tmp_path, capsys):
    """Until the job installs its own handlers, ray.init's SIGTERM handler calls sys.exit(SIGTERM)."""
    import omnilmm_ray.checks

    def sigterm(*a, **k):
        sys.exit(signal.SIGTERM)

    monkeypatch.setattr(omnilmm_ray.checks, "precheck", sigterm)
    args = ["--input", str(samples / "webdataset"), "--output", str(tmp_path / "out"), "--engine", "fake"]
    assert cli.main(args) == 143
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "interrupted; rerun the same command to resume [exit 143]"
