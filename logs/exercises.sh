#!/bin/bash
# The exercises of the edition of commit 5b0e499 (13 of them, with flags that have since left the file: run it with
# that commit's lmdisc.py). This edition's two-hour lab: logs/lab.sh.
# The README's exercises, as a student runs them, for one thread count and one seed, in a fresh run folder:
#   OMP_NUM_THREADS=T bash logs/exercises.sh SEED > logs/exercises-T-SEED.log 2>&1
# Run from the repository root. Exercise 7 edits one line of a copy of lmdisc.py (the dropout trap).
set -u
S=$1; T=${OMP_NUM_THREADS:?set OMP_NUM_THREADS}; R=runs/ex-$T-$S
ex() { echo; echo "=== $*"; local t0=$(date +%s.%N); "$@"; local rc=$?
       echo "=== rc $rc | $(python -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"; }
L="python lmdisc.py"
ex $L pipeline --seed $S --run $R
ex $L evaluate --checkpoint $R/lm.pt --disc $R/disc.pt                                        # 1
ex $L train-disc --negatives sample --seed $S --run $R                                        # 2
ex $L make-synthetic                                                                          # 3
ex $L pipeline --data synthetic --seed $S --run $R-synthetic
ex $L finetune --lr 1e-3 --seed $S --run $R                                                   # 5
ex $L finetune --lr 1e-2 --seed $S --run $R
ex $L curves $R/finetune-lr-0.01/ce.pt $R/finetune-lr-0.01/kl.pt
ex $L finetune --lr 1e-2 --kl-weight 0.3 --seed $S --run $R                                   # 6
ex $L finetune --lr 1e-2 --kl-weight 3 --seed $S --run $R
mkdir -p $R-trap && cp $R/lm.pt $R/disc.pt $R-trap/                                           # 7
sed 's/finetune_loss(log_q, y, torch.log_softmax(logits, -1), log_q0, s, kl_weight)/finetune_loss(log_q, y, log_q, log_q0, s, kl_weight)/' lmdisc.py > trap-$T-$S.py
grep -c "finetune_loss(log_q, y, log_q, log_q0" trap-$T-$S.py
ex python trap-$T-$S.py finetune --lr 1e-2 --seed $S --run $R-trap
rm trap-$T-$S.py
ex $L train-disc --split valid-a --epochs 5 --seed $S --run $R                                # 9
ex $L train-disc --arch temperature --lr 1e-2 --split valid-a --epochs 5 --seed $S --run $R
ex $L evaluate --checkpoint $R/lm.pt --disc $R/disc-epochs-5-split-valid-a.pt
ex $L evaluate --checkpoint $R/lm.pt --disc $R/disc-lr-0.01-epochs-5-arch-temperature-split-valid-a.pt
ex $L curves $R/disc-epochs-5-split-valid-a.pt $R/disc-lr-0.01-epochs-5-arch-temperature-split-valid-a.pt
ex $L analyze --run $R                                                                        # 10
ex $L top-words --run $R --prompt "the company said"
ex $L train-disc --arch temperature --lr 1e-2 --seed $S --run $R                              # 11
for m in lm.pt finetune/ce.pt finetune/kl.pt finetune-lr-0.01/ce.pt finetune-lr-0.01/kl.pt; do    # 13
  ex $L generate --checkpoint $R/$m --words 25; done
