#!/bin/bash
# Device call 2 of 2 (issue 17, branch locret30): join the 30-layer pack staged
# by tests/gpu/locret30-pack.sh (target/lr30a from call 1, target/lr30b carried
# now), unpack it, run the frozen SmolLM2-135M-Instruct once per 2048-token
# window (256 training + 16 held-out windows of Austen novels the quality suite
# does not read; features kept on the GPU, ~56 GB), and train tokraw retaining
# heads on all 30 layers: fine-tunes of the committed heads (--init) and heads
# from a seeded init. Writes $OUT/g-*.safetensors and one json.tgz.
# Device call 1 only needs: sha256sum -c (in target/lr30a) of part.sha256.
set -u
A=target/lr30a B=target/lr30b
BASE=python-shim/infinitehip/heads/smollm2-135m-instruct.h64.safetensors
export PYTHONPATH=python-shim PYTHONUNBUFFERED=1
test -f $A/pack30.tar.a || { echo "target/lr30a is not on this machine (call 1 missing, or the machine went cold)"; exit 3; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
t0=$(date +%s)
cat $A/pack30.tar.a $B/pack30.tar.b > /tmp/pack30.tar
R=$PWD
(cd /tmp && sha256sum -c $R/$B/pack30.tar.sha256) || exit 4
tar xf /tmp/pack30.tar -C /tmp && python3 -m infinitehip.locret_pack unpack /tmp/pack30 /tmp/m || exit 5
echo "unpack $(( $(date +%s) - t0 )) s"
C="python3 -m infinitehip.locret_train --model /tmp/m --tokens /tmp/m/tokens.npy --sequences 256 --holdout 16
   --epochs 3 --model-dtype float32 --compare $BASE --log-every 128"
# 1: fine-tunes of the committed heads (all 30 layers), tokraw as on the CPU run
$C --init $BASE --lr 2e-4 --out $OUT/g --deadline 150 ${LOCRET30_VARIANTS_INIT:---variant tr:loss=tokraw --variant tr4:loss=tokraw,rank_weight=4 --variant tr8e:loss=tokraw,epochs=8} \
  2>&1 | tee $OUT/train-init.log | grep -v '"epoch"'
echo "init variants done at $(( $(date +%s) - t0 )) s"
# 2: from a seeded init (no --init), tokraw
$C --out $OUT/s --deadline 120 ${LOCRET30_VARIANTS_SEED:---variant tr:loss=tokraw} \
  2>&1 | tee $OUT/train-seed.log | grep -v '"epoch"'
echo "all done at $(( $(date +%s) - t0 )) s"
(cd $OUT && tar czf json.tgz *.json *.log && rm -f *.json *.log)
ls -la $OUT
