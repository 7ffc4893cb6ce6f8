#!/bin/bash
# Stage (here, on the CPU machine) the 30-layer SmolLM2-135M-Instruct pack for
# tests/gpu/locret30-run.sh (issue 17, branch locret30): tokraw retaining heads
# trained on ALL 30 layers on one GPU.
#
# Why two folders: the whole pack (30 layers, 557K Austen tokens) is 61.9 MiB,
# and a device call carries at most 64 MiB including main's ~14.1 MiB of
# tracked files. It cannot be made to fit by cutting tokens: the layers'
# Q4_1 blocks alone are 54.2 MiB after xz (+ their scales 7.0 MiB) (their nibbles carry 3.85 bits of
# entropy out of 4), the embedding rows only a few MiB of that. So the pack (one tar
# of its files) is cut in two: target/lr30a (first half, ~31 MiB) and
# target/lr30b (second half); call 1 carries lr30a (with any other work: e.g.
# the lead's own GPU check, when tree + its carry + lr30a < 64 MiB), call 2
# carries lr30b and joins them. A warm machine keeps lr30a only ~30 s after
# call 1 ends, so call 2 must follow at once; locret30-run.sh exits 3 at once
# (no training) when lr30a is gone.
#
#   PYTHON=~/.cache/infinitehip-ci/venv-sglang-0.5.23/bin/python bash tests/gpu/locret30-pack.sh
set -euo pipefail
P=${PYTHON:-python3}
Q=${IHIP_QUALITY:-$HOME/.cache/infinitehip/quality}
T=target/locret30
TXT="$T/text/sensesensibility.txt $T/text/emma.txt $T/text/northangerabbey.txt $T/text/persuasion.txt"
for f in $TXT; do test -s $f || { echo "missing $f (see tests/gpu/logs/locret17c-2026-12-04d/README.md: the four novels)"; exit 1; }; done
rm -rf $T/pack30 target/lr30a target/lr30b
(cd python-shim && $P -m infinitehip.locret_pack pack $Q/models/SmolLM2-135M-Instruct.Q4_1.gguf \
   $Q/models/SmolLM2-135M-Instruct.Q4_1-hf $(for f in $TXT; do echo ../$f; done) --out ../$T/pack30 --max-tokens 557056)
mkdir -p target/lr30a target/lr30b
tar cf $T/pack30.tar -C $T pack30
split -n 2 -a 1 $T/pack30.tar $T/pack30.tar.   # two halves, ~31 MiB each
mv $T/pack30.tar.a target/lr30a/pack30.tar.a
mv $T/pack30.tar.b target/lr30b/pack30.tar.b
(cd $T && sha256sum pack30.tar) > target/lr30b/pack30.tar.sha256
(cd target/lr30a && sha256sum pack30.tar.a) > target/lr30a/part.sha256
rm $T/pack30.tar
du -b target/lr30a target/lr30b
