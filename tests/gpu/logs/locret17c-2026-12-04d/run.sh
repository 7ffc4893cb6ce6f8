#!/bin/bash
# Device run (issue 17, branch locret17c): unpack the 23-layer pack (Austen's
# Sense and Sensibility, Emma, Northanger Abbey, Persuasion: novels the
# quality suite does not evaluate on), run the frozen model once per training
# sequence (features cached on the GPU), and train several variants of
# retaining heads for layers 0..22 on the same features; each is compared on
# the held-out sequences with the committed heads.
set -u
C=target/locret17c-bin
export PYTHONPATH=$C/py PYTHONUNBUFFERED=1
BASE=python-shim/infinitehip/heads/smollm2-135m-instruct.h64.safetensors
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
t0=$(date +%s)
python3 -m infinitehip.locret_pack unpack $C/pack /tmp/m || exit 1
echo "unpack $(( $(date +%s) - t0 )) s"
python3 -m infinitehip.locret_train --model /tmp/m --tokens /tmp/m/tokens.npy --sequences 256 --holdout 16 \
  --epochs 3 --model-dtype float32 --compare $BASE --log-every 128 --out $OUT/a --deadline 140 \
  --variant h64:hidden=64 --variant h128:hidden=128 --variant h128col:hidden=128,loss=col \
  --variant h128tok:hidden=128,loss=tok --variant h256:hidden=256 --variant h128e8:hidden=128,epochs=8 \
  2>&1 | tee $OUT/train.log | grep -v '"epoch"'
echo "train done at $(( $(date +%s) - t0 )) s"
(cd $OUT && tar czf json.tgz *.json && rm -f *.json)
ls -la $OUT
