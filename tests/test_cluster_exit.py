"""The job's own exit code through the schedulers: `ray job submit` exits 1 for every failed job (0 for a
stopped one) and a RayJob only says Failed, so cluster/job-exit.sh reads the code from the job's last log line
(` [exit N]`, or `done: `) and both schedulers exit with it; the CronJob's Job retries by that code
(podFailurePolicy). The schedulers' scripts run here with stand-ins for `kubectl` and `ray` on the PATH."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from omnilmm_ray.cli import done_line

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
EXIT_SH = CLUSTER / "job-exit.sh"

# `ray job submit` of `omnilmm-caption` with an input that matches nothing, captured on a local Ray 2.60 (head
# started with `ray start --head`, submitted with RAY_AUTH_MODE=token; paths shortened). It exited 1; the job 2.
SUBMIT_FAILED_EXIT_2 = "\n".join(
    [
        "2026-12-07 02:13:45,027\tINFO cli.py:42 -- \x1b[37mJob submission server address\x1b[39m: \x1b[1mhttp://127.0.0.1:48265\x1b[22m",
        "2026-12-07 02:13:47,104\tSUCC cli.py:66 -- \x1b[32m-------------------------------------------------------\x1b[39m",
        "2026-12-07 02:13:47,105\tSUCC cli.py:67 -- \x1b[32mJob 'raysubmit_XwBGi4HAZy5vSfpM' submitted successfully\x1b[39m",
        "2026-12-07 02:13:47,105\tSUCC cli.py:68 -- \x1b[32m-------------------------------------------------------\x1b[39m",
        "2026-12-07 02:13:47,105\tINFO cli.py:330 -- \x1b[36mNext steps\x1b[39m",
        "2026-12-07 02:13:47,106\tINFO cli.py:331 -- Query the logs of the job:",
        "2026-12-07 02:13:47,106\tINFO cli.py:333 -- \x1b[1mray job logs raysubmit_XwBGi4HAZy5vSfpM\x1b[22m",
        "2026-12-07 02:13:47,106\tINFO cli.py:335 -- Query the status of the job:",
        "2026-12-07 02:13:47,106\tINFO cli.py:337 -- \x1b[1mray job status raysubmit_XwBGi4HAZy5vSfpM\x1b[22m",
        "2026-12-07 02:13:47,106\tINFO cli.py:339 -- Request the job to be stopped:",
        "2026-12-07 02:13:47,107\tINFO cli.py:341 -- \x1b[1mray job stop raysubmit_XwBGi4HAZy5vSfpM\x1b[22m",
        "2026-12-07 02:13:47,120\tINFO cli.py:351 -- Tailing logs until the job exits (disable with --no-wait):",
        "2026-12-07 02:13:46,694\tINFO job_manager.py:581 -- Runtime env is setting up.",
        "Running entrypoint for job raysubmit_XwBGi4HAZy5vSfpM: omnilmm-caption --input '/data/nothing/*.tar' --output /data/out --engine fake",
        "2026-12-07 02:13:51,552\tINFO worker.py:1691 -- Using address 192.0.2.2:46379 set in the environment variable RAY_ADDRESS",
        "2026-12-07 02:13:51,557\tINFO worker.py:1841 -- Connecting to existing Ray cluster at address: 192.0.2.2:46379...",
        "2026-12-07 02:13:51,588\tINFO worker.py:2029 -- Connected to Ray cluster. View the dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:48265 \x1b[39m\x1b[22m",
        "",
        "!" * 80,
        "!! FAKE ENGINE: captions are placeholders computed from pixel statistics, not model output",
        "!" * 80,
        "",
        "error: inputs: '/data/nothing/*.tar' matches no file; check the URI, glob and credentials [exit 2]",
        "2026-12-07 02:13:56,222\tINFO sdk.py:520 -- WebSocket closed for job raysubmit_XwBGi4HAZy5vSfpM with close code 1000",
        "2026-12-07 02:13:56,238\tERR cli.py:74 -- \x1b[31m---------------------------------------\x1b[39m",
        "2026-12-07 02:13:56,238\tERR cli.py:75 -- \x1b[31mJob 'raysubmit_XwBGi4HAZy5vSfpM' failed\x1b[39m",
        "2026-12-07 02:13:56,238\tERR cli.py:76 -- \x1b[31m---------------------------------------\x1b[39m",
        "2026-12-07 02:13:56,238\tINFO cli.py:89 -- Status message: Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):",
        "Running entrypoint for job raysubmit_XwBGi4HAZy5vSfpM: omnilmm-caption --input '/data/nothing/*.tar' --output /data/out --engine fake",
        "2026-12-07 02:13:51,552\tINFO worker.py:1691 -- Using address 192.0.2.2:46379 set in the environment variable RAY_ADDRESS",
        "2026-12-07 02:13:51,557\tINFO worker.py:1841 -- Connecting to existing Ray cluster at address: 192.0.2.2:46379...",
        "2026-12-07 02:13:51,588\tINFO worker.py:2029 -- Connected to Ray cluster. View the dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:48265 \x1b[39m\x1b[22m",
        "",
        "!" * 80,
        "!! FAKE ENGINE: captions are placeholders computed from pixel statistics, not model output",
        "!" * 80,
        "",
        "error: inputs: '/data/nothing/*.tar' matches no file; check the URI, glob and credentials [exit 2]",
        "",
        "",
    ]
)
_HEAD, _TAIL = SUBMIT_FAILED_EXIT_2.split("Tailing logs until the job exits (disable with --no-wait):\n")
_JOB_START = _TAIL.split("\n\n" + "!" * 80)[0]  # the job's first lines, up to the fake engine's banner


def _submit(job_last_line: str, ray_after: list[str]) -> str:
    """A `ray job submit` transcript like the captured one, for a job whose last line is `job_last_line`;
    Ray's own lines after it as cli.py prints them (dashboard/modules/job/cli.py: _log_job_status)."""
    return "\n".join(
        [
            _HEAD + "Tailing logs until the job exits (disable with --no-wait):",
            _JOB_START,
            job_last_line,
            *ray_after,
        ]
    )


SUMMARY = {
    "run": "20261201T010000000000Z",
    "rows": 176,
    "counts": {"ok": 170, "error": 6, "cached": 0},
    "errors_by_kind": {"decode_error": {"count": 4}, "not_an_image": {"count": 2}},
    "this_attempt": {"images_per_s": 30.6},
}
DONE = done_line(SUMMARY, "s3://b/captions")  # the CLI's own success line
SUCCEEDED = [
    "2026-12-01 03:12:09,001\tSUCC cli.py:66 -- \x1b[32m---------------------------------------------\x1b[39m",
    "2026-12-01 03:12:09,001\tSUCC cli.py:67 -- \x1b[32mJob 'raysubmit_XwBGi4HAZy5vSfpM' succeeded\x1b[39m",
    "2026-12-01 03:12:09,001\tSUCC cli.py:68 -- \x1b[32m---------------------------------------------\x1b[39m",
    "",
]
STOPPED = [
    "2026-12-01 03:12:09,001\tWARN cli.py:85 -- \x1b[33mJob 'raysubmit_XwBGi4HAZy5vSfpM' was stopped\x1b[39m"
]


def job_exit(text: str) -> int:
    assert EXIT_SH.is_file()  # `sh` exits 2 on a missing script, a code these tests expect
    return subprocess.run(["sh", str(EXIT_SH)], input=text.encode(), capture_output=True).returncode


@pytest.mark.parametrize(
    "log, code",
    [
        (SUBMIT_FAILED_EXIT_2, 2),  # the last line is Ray's status message repeating the job's log tail
        (_submit(DONE, SUCCEEDED), 0),  # Ray's success banner comes after the job's `done:` line
        # `ray job stop`: submit exits 0, the job was interrupted
        (_submit("interrupted; rerun the same command to resume [exit 143]", STOPPED), 143),
        (
            _submit(
                "error: output is in use: another job (host h, pid 7) holds s3://b/c/_lock.json [exit 4]", []
            ),
            4,
        ),
        # a terminal over ssh (`ray exec`) ends lines with \r\n
        (
            _submit("error: 12.5% of rows are errors (sink.max_error_rate=0.05) [exit 3]", []).replace(
                "\n", "\r\n"
            ),
            3,
        ),
        # the driver was killed (no last line of its own) or the log stream broke: retried like a crash
        (_JOB_START + "\nprogress: 1,204/~20,480 images (6%), shards 3/80 committed", 1),
        ("", 1),
    ],
)
def test_job_exit_reads_the_jobs_code_from_real_log_lines(log, code):
    assert job_exit(log) == code


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"}
    console_script = "import sys; from omnilmm_ray.cli import main; sys.exit(main())"  # what pip installs
    return subprocess.run(
        [sys.executable, "-c", console_script, *args], env=env, capture_output=True, timeout=120
    )


def test_job_exit_agrees_with_the_cli_itself(tmp_path):
    """The CLI's real output (failures that need no Ray) through job-exit.sh gives the CLI's own exit code."""
    out = tmp_path / "out"
    out.mkdir()
    lock = {"owner": "x", "host": "other-host", "pid": 1, "heartbeat": time.time()}
    (out / "_lock.json").write_text(json.dumps(lock))
    runs = [
        _cli(["--batch-size", "0", "--input", "x", "--output", str(tmp_path / "o2")]),  # config
        _cli(["--input", str(tmp_path / "none.tar"), "--output", str(out), "--engine", "fake"]),  # lease
    ]
    assert [r.returncode for r in runs] == [2, 4]
    for r in runs:
        assert job_exit((r.stdout + r.stderr).decode()) == r.returncode


# --- the Kubernetes CronJob -------------------------------------------------------------------------------

KUBECTL = """#!PYTHON
# kubectl stand-in: records its calls; `get` answers from answers.json, the RayJob's states one per poll.
import json, sys
from pathlib import Path
here = Path(__file__).parent
args = sys.argv[1:]
with open(here / "calls", "a") as f:
    f.write(" ".join(args) + "\\n")
a = json.loads((here / "answers.json").read_text())
if args[0] == "create":
    print("rayjob.ray.io/caption-nightly-x7k2p")
elif args[0] == "get":
    field = args[-1].removeprefix("jsonpath={.status.").removesuffix("}")
    if field == "jobDeploymentStatus":
        n = (here / "polls").read_text().count(".") if (here / "polls").exists() else 0
        (here / "polls").write_text("." * (n + 1))
        print(a["states"][min(n, len(a["states"]) - 1)], end="")
    else:
        print(a.get(field, ""), end="")
"""
# sleep stand-in: a poll loop that never ends fails the test after 5 polls instead of hanging it
SLEEP = '#!/bin/sh\nn=$(cat "$0.n" 2>/dev/null || echo 0); echo $((n + 1)) >"$0.n"; [ $n -lt 5 ] || exit 99\n'


def _cronjob_pod():
    *_, cron = [d for d in yaml.safe_load_all((CLUSTER / "cronjob.yaml").read_text()) if d]
    return cron["spec"]["jobTemplate"]["spec"], cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def run_cronjob_pod(tmp_path: Path, states: list[str], **status) -> tuple[int, list[str]]:
    """The CronJob container's command, with its ConfigMap mounted at a temporary folder."""
    _, pod = _cronjob_pod()
    (container,) = pod["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    spec, stubs = tmp_path / "spec", tmp_path / "bin"
    spec.mkdir()
    stubs.mkdir()
    shutil.copy(CLUSTER / "rayjob.yaml", spec / "rayjob.yaml")
    shutil.copy(EXIT_SH, spec / "job-exit.sh")
    (stubs / "kubectl").write_text(KUBECTL.replace("PYTHON", sys.executable))
    (stubs / "sleep").write_text(SLEEP)
    for f in ("kubectl", "sleep"):
        (stubs / f).chmod(0o755)
    (stubs / "answers.json").write_text(json.dumps({"states": states, **status}))
    script = container["args"][0].replace(f"{mount}/", f"{spec}/")
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run([*container["command"], script], env=env, capture_output=True, text=True, timeout=60)
    return r.returncode, (stubs / "calls").read_text().splitlines()


FAILED_2 = SUBMIT_FAILED_EXIT_2.split("Status message: ")[1]  # KubeRay copies Ray's status message verbatim


@pytest.mark.parametrize(
    "states, status, code",
    [
        (
            ["Initializing", "Running", "Complete"],
            {"jobStatus": "SUCCEEDED", "message": "Job finished successfully."},
            0,
        ),
        (["Running", "Failed"], {"jobStatus": "FAILED", "reason": "AppFailed", "message": FAILED_2}, 2),
        (
            ["Failed"],
            {
                "jobStatus": "FAILED",
                "reason": "AppFailed",
                "message": FAILED_2.replace("code 2", "code 4").replace("[exit 2]", "[exit 4]"),
            },
            4,
        ),
        (
            ["Failed"],
            {
                "jobStatus": "FAILED",
                "reason": "AppFailed",
                "message": "Job entrypoint command failed with exit code -9. No logs available.",
            },
            1,
        ),
        (
            ["Failed"],
            {"jobStatus": "", "reason": "SubmissionFailed", "message": "Job submission has failed."},
            1,
        ),
        (["Running", "Failed"], {"jobStatus": "RUNNING", "reason": "DeadlineExceeded"}, 124),
    ],
)
def test_cronjob_pod_exits_with_the_jobs_code(tmp_path, states, status, code):
    rc, calls = run_cronjob_pod(tmp_path, states, **status)
    assert rc == code
    assert calls[0].startswith("create -f ") and not any(c.startswith("delete") for c in calls)


def test_cronjob_pod_stops_on_validation_failed_and_deletes_that_rayjob(tmp_path):
    """KubeRay refuses a spec with ValidationFailed, a terminal state: the pod must not poll to its deadline,
    and must delete the RayJob (no deletionRule applies to it)."""
    msg = "The RayJob spec is invalid: RayJobDeletionPolicy feature gate must be enabled to use DeletionStrategy"
    rc, calls = run_cronjob_pod(tmp_path, ["ValidationFailed"], reason="ValidationFailed", message=msg)
    assert rc == 2  # nothing will change on a retry: FailJob
    assert "delete rayjob.ray.io/caption-nightly-x7k2p --wait=false" in calls


def test_cronjob_pod_deletes_its_rayjob_when_stopped(tmp_path):
    """SIGTERM (the Job's deadline, an eviction, `kubectl delete job`) stops the run it started."""
    _, pod = _cronjob_pod()
    (container,) = pod["containers"]
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "kubectl").write_text(KUBECTL.replace("PYTHON", sys.executable))
    (stubs / "kubectl").chmod(0o755)
    (stubs / "answers.json").write_text(json.dumps({"states": ["Running"]}))
    script = container["args"][0].replace("/spec/", f"{tmp_path}/")
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    # its own session, so that the `sleep` it leaves behind can be ended with it
    p = subprocess.Popen([*container["command"], script], env=env, start_new_session=True)
    try:
        while not (stubs / "polls").exists() and p.poll() is None:  # until it waits on its RayJob
            time.sleep(0.05)
        p.terminate()
        rc = p.wait(timeout=120)  # only a guard against a hang
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert rc == 143
    assert (stubs / "calls").read_text().splitlines()[
        -1
    ] == "delete rayjob.ray.io/caption-nightly-x7k2p --wait=false"


def test_cronjob_job_retries_crashes_only_and_the_rayjob_not_at_all():
    job, pod = _cronjob_pod()
    kubernetes_validate.validate(
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, "spec": job},
        "1.30.0",
        strict=True,
    )
    assert job["backoffLimit"] >= 1 and pod["restartPolicy"] == "Never"
    rules = job["podFailurePolicy"]["rules"]
    (fail,) = [r for r in rules if r["action"] == "FailJob"]
    on = fail["onExitCodes"]
    assert on["containerName"] == pod["containers"][0]["name"] and on["operator"] == "In"
    assert {2, 3, 4} <= set(on["values"]) and 1 not in on["values"]
    # KubeRay's own retries would ignore the exit code and multiply the Job's
    for name in ("rayjob.yaml", "raycronjob.yaml"):
        (doc,) = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
        spec = doc["spec"].get("jobTemplate", doc["spec"])
        assert spec.get("backoffLimit", 0) == 0, name
    # the ConfigMap the pod mounts holds the parser it runs
    made = "--from-file=job-exit.sh=cluster/job-exit.sh"
    assert made in (CLUSTER / "cronjob.yaml").read_text()
    assert "sh /spec/job-exit.sh" in pod["containers"][0]["args"][0]


# --- VMs: cluster/nightly-submit.sh --------------------------------------------------------------------------

RAY = """#!/bin/sh
# ray stand-in: `ray up` succeeds; `ray exec` prints a `ray job submit` transcript and exits 1, as submit does
echo "$*" >>"$0.calls"
[ "$1" = exec ] || exit 0
cat "$0.out"
exit 1
"""


@pytest.mark.parametrize("log, code", [(SUBMIT_FAILED_EXIT_2, 2), (_submit(DONE, SUCCEEDED), 0)])
def test_nightly_submit_exits_with_the_jobs_code(tmp_path, log, code):
    (tmp_path / "ray").write_text(RAY)
    (tmp_path / "ray").chmod(0o755)
    (tmp_path / "ray.out").write_text(log)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["sh", str(CLUSTER / "nightly-submit.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == code, r.stdout[-2000:] + r.stderr[-2000:]
    assert DONE in r.stdout if code == 0 else "[exit 2]" in r.stdout  # the log is still shown
    up, submit = (tmp_path / "ray.calls").read_text().splitlines()
    assert up.startswith("up ") and "ray job submit" in submit and "-- omnilmm-caption " in submit
