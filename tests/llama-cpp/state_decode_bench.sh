#!/usr/bin/env bash
# Decode speed from one saved KV, stock vs patched builds/configs, every timed run under the timing lock.
#
#   STATE=stock16k.state IDS=emma.ids DEPTH=16384 tests/llama-cpp/state_decode_bench.sh OUT GEN REPS \
#       NAME=TREE:CONFIG ...
#
# TREE: a llama.cpp work tree (scripts/llama-cpp-build.sh's LLAMA_CPP_WORK); CONFIG: a policy JSON, or
# `stock` (TREE/build-stock, no plugin), optionally followed by `:VAR=VALUE` (one environment variable
# for that run, e.g. `:LLAMA_INFINITEHIP_ATTEND_SPLIT=0`). Make the state once with stock:
#   TREE/build-stock/bin/ihip_run tokenize MODEL --text TEXT --out IDS
#   TREE/build-stock/bin/ihip_run fill MODEL --depth DEPTH --state STATE --input IDS --ctx CTX --fa on
# Each run: `ihip_run bench --state STATE --depths DEPTH --gen GEN` (one untimed step, then GEN-1 timed
# steps; decode cost does not depend on the cached values), 2 threads, flash attention on, plugin runs with
# LLAMA_INFINITEHIP_PROFILE=1; reps interleaved. Appends one line per run (time, load average, bench JSON,
# plugin stats) to OUT.txt. QPID: a process of yours to SIGSTOP during each timed run (SIGCONT after).
set -u
: "${STATE:?}" "${IDS:?}" "${DEPTH:?}"
MODEL=${MODEL:-$HOME/.cache/infinitehip/quality/models/SmolLM2-135M-Instruct.Q4_1.gguf}
CTX=${CTX:-$(( (DEPTH + 256 + 255) / 256 * 256 ))}
trap '[ -n "${QPID:-}" ] && kill -CONT "$QPID" 2>/dev/null' EXIT
out=$1; gen=$2; reps=$3; shift 3
for r in $(seq 1 "$reps"); do
  for spec in "$@"; do
    name=${spec%%=*}; rest=${spec#*=}; tree=${rest%%:*}; cfg=${rest#*:}
    env=(INFINITEHIP_THREADS=2)
    case $cfg in *:*=*) env+=("${cfg#*:}"); cfg=${cfg%%:*};; esac
    if [ "$cfg" = stock ]; then exe=$tree/build-stock/bin/ihip_run
    else exe=$tree/build-patched/bin/ihip_run; env+=(LLAMA_INFINITEHIP_PROFILE=1 LLAMA_INFINITEHIP_CONFIG="$cfg"); fi
    [ -n "${QPID:-}" ] && kill -STOP "$QPID" 2>/dev/null && sleep 1
    up=$(uptime | sed 's/.*load average: //')
    res=$(env "${env[@]}" flock /tmp/ihip-timing.lock nice -n -10 "$exe" bench "$MODEL" --depth "$DEPTH" \
          --state "$STATE" --depths "$DEPTH" --gen "$gen" --input "$IDS" --ctx "$CTX" --threads 2 --batch 512 \
          --fa on 2>"$out-$name-$r.err" | tail -1)
    [ -n "${QPID:-}" ] && kill -CONT "$QPID" 2>/dev/null
    echo "$(date -u +%H:%M:%S) rep $r $name load [$up] $res $(grep -o 'infinitehip: stats .*' "$out-$name-$r.err" | tail -1)" \
      | tee -a "$out.txt"
  done
done
