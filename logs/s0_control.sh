#!/bin/bash
# The s = 0 control on `tiny`: is phase 3's gain the discriminator's, or staying near q0? For one thread count and
# one seed, in a fresh run folder (run from the repository root):
#   OMP_NUM_THREADS=T bash logs/s0_control.sh SEED > logs/s0-control/tiny-T-SEED.log 2>&1
# then `python logs/s0_table.py logs/s0-control/*.log` prints the comparison.
set -u
S=$1; T=${OMP_NUM_THREADS:?set OMP_NUM_THREADS}; R=runs/s0-$T-$S
ex() { echo; echo "=== $*"; "$@"; echo "=== rc $?"; }
L="python lmdisc.py"
ex $L pipeline --seed $S --run $R                                       # the LSTM discriminator, lr 1e-4
ex $L train-disc --arch constant --seed $S --run $R                      # s = s0 everywhere: p_hat = q0
ex $L finetune --disc $R/disc-arch-constant.pt --seed $S --run $R
for D in disc disc-arch-constant; do ex $L finetune --lr 1e-2 --disc $R/$D.pt --seed $S --run $R; done
