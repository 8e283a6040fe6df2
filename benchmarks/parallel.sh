#!/usr/bin/env bash
# Run benchmarks/run.py jobs side by side, one process per line of a job file (the arguments
# of one run.py call; '#' lines and blank lines are skipped), each with its own log and a
# wall-clock limit. Small models at 32x32 leave a GPU mostly idle in one process, so on a
# lent GPU machine (16 cores) a dozen jobs at once finish in about the time of the longest.
#
#   bash benchmarks/parallel.sh JOB_FILE LOG_DIR SECONDS [THREADS_PER_JOB]
#
# Each job's results JSON is rewritten after every row (run.py), so a job stopped at its
# limit keeps what it measured. Exit status: 0 when every job ended by itself.
set -u
jobs_file=$1
logs=$2
limit=$3
threads=${4:-1}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$logs"
n=0
while IFS= read -r line; do
    [[ -z "${line// /}" || "$line" == \#* ]] && continue
    n=$((n + 1))
    # shellcheck disable=SC2086 # a job line is a list of arguments
    OMP_NUM_THREADS=$threads PYTHONUNBUFFERED=1 timeout "$limit" \
        python "$here/run.py" $line >"$logs/job$n.log" 2>&1 &
    echo "job$n: run.py $line"
done <"$jobs_file"
status=0
for pid in $(jobs -p); do
    wait "$pid" || status=1
done
exit $status
