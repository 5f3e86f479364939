#!/bin/sh
# One nightly run on the VM cluster of cluster/ray-cluster.yaml, from a machine with this checkout, the
# `ray` CLI (pip install 'ray[default]==2.60.0') and the cluster's SSH access. Scheduled by
# cluster/omnilmm-nightly.timer, or by cron with flock so that runs never overlap:
#   0 1 * * * cd /opt/omnilmm-ray && flock -n /tmp/omnilmm-nightly.lock sh cluster/nightly-submit.sh >>/var/log/omnilmm-nightly.log 2>&1
# Exits with the job's own exit code (README, Running a job: 2 config, 3 error budget, 4 output held, ...),
# not `ray job submit`'s, which is 1 for every failure.
set -eu
cd "$(dirname "$0")/.."
# Starts the head if it is down and syncs file_mounts (the job config); a running cluster is left as it is.
ray up -y --no-restart cluster/ray-cluster.yaml
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Blocks until the job ends, streaming its log here as well; whatever `ray exec` exits with, the job's code is
# on the log's last line (cluster/job-exit.sh), and a log without one (the stream broke) gives 1.
ray exec cluster/ray-cluster.yaml \
    "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 -- omnilmm-caption --config /home/ray/job.yaml" \
    2>&1 | tee "$log" || true
code=0
sh cluster/job-exit.sh <"$log" || code=$?
echo "nightly-submit: the job exited with $code"
exit "$code"
