#!/usr/bin/env bash
# Run benchmark jobs side by side, one GPU each, on a multi-GPU machine.
#
#   bash benchmarks/gpu_jobs.sh SECONDS "GPUS|NAME|COMMAND" ["GPUS|NAME|COMMAND" ...]
#
# Each job runs `COMMAND` under bash with CUDA_VISIBLE_DEVICES=GPUS (e.g. "0" or "0,1"), OUT=$OUT/NAME (a
# folder of its own, so the jobs' logs and JSON never collide) and a limit of SECONDS, its output in
# $OUT/NAME.log. The script waits for every job, then prints each job's exit status and the last lines of
# its log. Jobs that need the same GPU go into one COMMAND, joined with ';'.
set -u
limit=$1; shift
: "${OUT:=$PWD/gpu_jobs_out}"
mkdir -p "$OUT"
names=(); pids=()
for spec in "$@"; do
  gpus=${spec%%|*}; rest=${spec#*|}; name=${rest%%|*}; cmd=${rest#*|}
  mkdir -p "$OUT/$name"
  echo "[gpu_jobs] $name on GPU $gpus: $cmd"
  CUDA_VISIBLE_DEVICES=$gpus OUT="$OUT/$name" timeout -k 10 "$limit" bash -c "$cmd" >"$OUT/$name.log" 2>&1 &
  pids+=($!); names+=("$name")
done
status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  [ $rc -ne 0 ] && status=1
  echo "[gpu_jobs] ${names[$i]}: exit $rc"
done
for n in "${names[@]}"; do
  echo "===== $n (last lines of $OUT/$n.log)"
  tail -n "${TAIL_LINES:-25}" "$OUT/$n.log" | cut -c1-300
done
exit $status
