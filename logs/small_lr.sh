#!/bin/bash
# The paper's one knob on `small`, with the s = 0 control beside it (one seed, 2 threads). After phase 1
# (`python lmdisc.py train --preset small --run RUN`), from the repository root:
#   bash logs/small_lr.sh RUN > logs/small-lr.log 2>&1
set -u
R=$1; L="python lmdisc.py"
ex() { echo; echo "=== $*"; "$@"; echo "=== rc $?"; }
ex $L train-disc --preset small --run $R                                 # the paper's: LSTM, the LM's training text
ex $L train-disc --preset small --run $R --arch constant                 # s = s0 everywhere: p_hat = q0
for lr in 1e-4 3e-4 1e-3; do
  for D in disc disc-arch-constant; do ex $L finetune --preset small --run $R --lr $lr --disc $R/$D.pt; done
done
