#!/bin/sh
# Exits with the exit code of an omnilmm-caption run, read from its log on stdin.
#   ... ray job submit ... | tee job.log; sh cluster/job-exit.sh <job.log          (cluster/nightly-submit.sh)
#   kubectl get rayjob NAME -o jsonpath='{.status.message}' | sh job-exit.sh      (cluster/cronjob.yaml)
# Why: `ray job submit` exits 1 for every failed job (0 for a stopped one) and a RayJob only says Failed, so a
# scheduler would retry a config error (2) or a held output (4) like a crash (1). The job says its code in its
# last line: a failure's ends in ` [exit N]`, a success's starts with `done: `. The last such line wins: Ray
# prints its own lines after the job's (and repeats the log's tail in a failed job's status message), and a
# colour code or a carriage return (a terminal over ssh) may surround it. No such line (the driver was killed,
# the log stream broke): 1, the code that is retried.
set -eu
esc=$(printf '\033')
code=$(tr -d '\r' | awk -v esc="$esc" '
    { gsub(esc "\\[[0-9;]*[A-Za-z]", ""); sub(/[ \t]+$/, "") }
    /^done: / { code = 0; found = 1 }
    / \[exit [0-9]+\]$/ { n = $NF; sub(/\]$/, "", n); code = n + 0; found = 1 }
    END { print (found ? code : 1) }')
exit "$code"
