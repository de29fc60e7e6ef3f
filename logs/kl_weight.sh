#!/bin/bash
# Beyond the paper (it tunes the lr alone): the KL's weight at one lr, with the control and the s = 0 control at each
# weight, after logs/route.sh has run on RUN. From the repository root, one thread:
#   OMP_NUM_THREADS=1 bash logs/kl_weight.sh PRESET RUN LR > logs/route/PRESET-kl-weight.log 2>&1
set -u
P=$1; R=$2; LR=$3; L="python lmdisc.py"
ex() { echo; echo "=== $*"; "$@"; echo "=== rc $?"; }
for w in 3 10 30; do
  ex $L finetune --preset $P --run $R --lr $LR --kl-weight $w
  ex $L finetune --preset $P --run $R --lr $LR --kl-weight $w --disc $R/disc-arch-constant.pt
done
