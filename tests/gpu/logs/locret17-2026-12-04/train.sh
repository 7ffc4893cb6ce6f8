#!/bin/bash
# Device run (issue 17, branch locret17): unpack the 26-layer pack, train
# SmolLM2-135M-Instruct retaining heads for layers 0..25 at 8192 and 4096
# tokens (and with targets from the last 1024 queries at 8192), each compared on its
# held-out sequences with the committed heads.
set -u
C=target/locret17-carry
export PYTHONPATH=$C/py PYTHONUNBUFFERED=1
BASE=python-shim/infinitehip/heads/smollm2-135m-instruct.h64.safetensors
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
t0=$(date +%s)
python3 -m infinitehip.locret_pack unpack $C/pack /tmp/m || exit 1
echo "unpack $(( $(date +%s) - t0 )) s"
train() {  # name, extra args
  n=$1; shift
  python3 -m infinitehip.locret_train --model /tmp/m --tokens /tmp/m/tokens.npy --holdout 8 --epochs 3 \
    --model-dtype float32 --compare $BASE --log-every 16 --out $OUT/$n "$@" 2>&1 | tee -a $OUT/train.log | tail -n 4
  echo "$n done at $(( $(date +%s) - t0 )) s"
}
train s8192.h64 --seq-len 8192 --sequences 64
train s4096.h64 --seq-len 4096 --sequences 128
train s8192.r1024.h64 --seq-len 8192 --sequences 64 --response 1024
