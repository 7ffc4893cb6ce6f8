#!/usr/bin/env bash
# Issue 14: why a stage-2-only refresh step (steps 4 / 12 of the cycle) costs ~47 us per hip layer inside the
# 32-layer step (host metadata) but ~30 in the single-layer profile and ~39 as one CUDA graph. Suspect:
# programmatic dependent launch chains (every PDL-ready kernel triggers its dependent at entry, so score s2,
# top-k s2, assemble and the attention of the next layers can sit resident behind the running kernel). The
# 32-layer step at 128K and 1M, batch 1, mean_key, default intervals, per PDL variant: default sites; without
# score2; only meta,score0,attn,dense; PDL off; trigger after the wait (INFINITEHIP_PDL_TRIGGER=after_wait)
# with the default sites and with every site; default again. Then `gpu-test --step-only` with the late
# trigger. Per-step table by tests/gpu/model_steps.py. Logs in $OUT/all.tgz, the summary on stdout.
#   here:  bash scripts/gpu-check.sh      (gpu-bin/)
#   there (at the commit before 2026-12-06 third session's score_open; INFINITEHIP_PDL_TRIGGER was an experiment, removed): run(command="BUDGET=330 bash tests/gpu/logs/pdl-2026-12-06/variants/pdl-run.sh", carry=["gpu-bin"], kind="nvidia-h200", timeout_s=360)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out}; mkdir -p "$OUT/logs"; L="$OUT/logs"
source tests/gpu/device-env.sh
T0=$(date +%s); left() { echo $(( ${BUDGET:-330} - ($(date +%s) - T0) )); }
at() { echo "$1: rc=$2 at $(( $(date +%s) - T0 )) s" >> "$L/device.txt"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; uptime; } > "$L/device.txt"
timeout 40 python3 scripts/sdpa_bench.py --tokens 1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$L/sdpa.json" > "$L/sdpa.log" 2>&1; at sdpa $?
D=meta,score0,score2,topk1,topk2,assemble,attn,dense
for v in "default|" "noscore2|INFINITEHIP_PDL_SITES=meta,score0,topk1,topk2,assemble,attn,dense" \
         "attnonly|INFINITEHIP_PDL_SITES=meta,score0,attn,dense" "off|INFINITEHIP_PDL=0" \
         "late|INFINITEHIP_PDL_TRIGGER=after_wait" "lateall|INFINITEHIP_PDL_TRIGGER=after_wait INFINITEHIP_PDL_SITES=all" \
         "default2|" "late2|INFINITEHIP_PDL_TRIGGER=after_wait"; do
  [ "$(left)" -gt 30 ] || break
  n=${v%%|*} envs=${v#*|}
  # Cold JIT of a module set (first run, and the first after_wait run) takes ~60 s.
  t=45; case $n in default|late) t=150;; esac
  env $envs timeout $t gpu-bin/infinitehip bench-gpu-model --tokens 131072,1048576 --batch 1 --reps 3 \
    --baseline "$L/sdpa.json" --decode-stage0 mean_key --json "$L/model-$n.json" > "$L/model-$n.log" 2>&1
  at "model $n" $?
done
t=$(( $(left) - 5 )); [ $t -gt 150 ] && t=150
[ $t -gt 30 ] && { INFINITEHIP_PDL_TRIGGER=after_wait timeout $t gpu-bin/infinitehip gpu-test --step-only \
  > "$L/step-check-late.log" 2>&1; at step-check-late $?; }
python3 tests/gpu/model_steps.py "$L"/model-*.json
[ -f "$L/step-check-late.log" ] && { echo "-- step-check-late: $(grep -c '^PASS' "$L/step-check-late.log") PASS, \
$(grep -c '^FAIL' "$L/step-check-late.log") FAIL"; grep '^FAIL' "$L/step-check-late.log" | cut -c1-400; }
cat "$L/device.txt"
tar czf "$OUT/all.tgz" -C "$OUT" logs && rm -rf "$L"
