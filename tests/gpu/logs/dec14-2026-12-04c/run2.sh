#!/usr/bin/env bash
# dec14 device call 2: run(command="BUDGET=172 OUT=$OUT bash target/dec14-bin/run2.sh", carry=["target/dec14-bin"]).
# Which launch sites should carry the PDL attribute: the 32-layer step per site set (INFINITEHIP_PDL_SITES),
# same SDPA baseline, then the step checks with a mixed site set. Modules load lazily (cold machine: JIT only what runs).
set -uo pipefail
H=target/dec14-bin; B=$H/infinitehip
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 INFINITEHIP_CACHE=/tmp/ihip-cache INFINITEHIP_LAZY_MODULES=all
mkdir -p "$INFINITEHIP_CACHE"; cp $H/ptx/*.ptx "$INFINITEHIP_CACHE/" 2>/dev/null
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null); do
  [ -e "$d/libnvrtc.so.13" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}" && break
done
T0=$(date +%s); left() { echo $(( ${BUDGET:-172} - ($(date +%s) - T0) )); }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; date -u; uptime; } > "$OUT/device.txt"
step() {  # step NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2; local s=$(date +%s)
  [ "$t" -gt "$(left)" ] && t=$(( $(left) - 3 ))
  [ "$t" -lt 5 ] && { echo "$name: not run (no time left)" >> "$OUT/device.txt"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/device.txt"
}
step sdpa 40 python3 $H/sdpa_bench.py --tokens 131072,1048576 --batch 1 --reps 3 --prefill-tokens '' \
  --model-tokens 131072,1048576 --model-batch 1 --json "$OUT/sdpa.json"
M="--tokens 131072,1048576 --batch 1 --reps 3 --baseline $OUT/sdpa.json"
V0=all
V2=meta,score0,score1,score2,topk1,topk2,assemble,attn,dense
V3=meta,score0,score2,topk0,topk1,topk2,assemble,attn,dense
V4=meta,score0,score2,topk1,topk2,assemble,attn,dense
V5=meta,score0,score1,score2,assemble,attn,dense
V6=meta,assemble,attn,dense
for v in V0 V1 V2 V3 V4 V5 V6 V0b V1b; do
  case $v in V1|V1b) S=none;; V0b) S=$V0;; *) S=${!v};; esac
  step model-$v 80 env INFINITEHIP_PDL_SITES=$S $B bench-gpu-model $M --json "$OUT/model-$v.json"
done
step step-check-V4 60 env INFINITEHIP_PDL_SITES=$V4 $B gpu-test --step-only
cd "$OUT" && tar czf logs.tgz *.log *.json device.txt && cd - > /dev/null
echo "== summary"
f=step-check-V4; [ -f "$OUT/$f.log" ] && { echo "-- $f: $(grep -c '^PASS' "$OUT/$f.log") PASS, $(grep -c '^FAIL' "$OUT/$f.log") FAIL"; grep '^FAIL' "$OUT/$f.log" | cut -c1-300; grep -o 'programmatic dependent launch [a-z]*: PDL launches != plain[^;]*; ' "$OUT/$f.log"; }
for v in V0 V1 V2 V3 V4 V5 V6 V0b V1b; do
  f=model-$v; [ -f "$OUT/$f.log" ] && { echo "-- $v $(grep -o 'programmatic dependent launch.*' "$OUT/$f.log")"; grep -E '^\| 1[0-9]+ \|' "$OUT/$f.log" | cut -d'|' -f2,5,6,8,10; grep -A4 '^| path' "$OUT/$f.log" | grep -E 'host|graph'; }
done
rm -f "$OUT"/*.log "$OUT"/model-*.json
cat "$OUT/device.txt"
