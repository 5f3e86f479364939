#!/bin/sh
# One nightly run on the VM cluster of cluster/ray-cluster.yaml, from a machine with this checkout, the
# `ray` CLI (pip install 'ray[default]==2.60.0') and the cluster's SSH access. Scheduled by
# cluster/omnilmm-nightly.timer, or by cron with flock so that runs never overlap:
#   0 1 * * * cd /opt/omnilmm-ray && flock -n /tmp/omnilmm-nightly.lock sh cluster/nightly-submit.sh >>/var/log/omnilmm-nightly.log 2>&1
set -eu
cd "$(dirname "$0")/.."
# Starts the head if it is down and syncs file_mounts (the job config); a running cluster is left as it is.
ray up -y --no-restart cluster/ray-cluster.yaml
# Blocks until the job ends; exits non-zero when it failed (`ray job logs` ends with the reason).
exec ray exec cluster/ray-cluster.yaml \
    "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 -- omnilmm-caption --config /home/ray/job.yaml"
