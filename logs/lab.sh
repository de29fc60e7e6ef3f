#!/bin/bash
# The two-hour lab's core exercises (README, "Exercises"), as a student runs them, for one thread count and one
# seed, in a fresh run folder; each step's exit code and seconds. Run from the repository root:
#   OMP_NUM_THREADS=T bash logs/lab.sh SEED > logs/lab/lab-T-SEED.log 2>&1
# then `python logs/lab_table.py logs/lab/*.log` puts each lesson's numbers side by side.
set -u
S=$1; T=${OMP_NUM_THREADS:?set OMP_NUM_THREADS}; R=runs/lab-$T-$S
ex() { echo; echo "=== $*"; local t0=$(date +%s.%N); "$@"; local rc=$?
       echo "=== rc $rc | $(python -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"; }
L="python lmdisc.py"
ex $L pipeline --seed $S --run $R                                                   # 1: the run (and 5, 6 at 1e-4)
ex $L evaluate --checkpoint $R/lm.pt --disc $R/disc.pt                              # 2: chance level
ex $L finetune --lr 1e-3 --seed $S --run $R                                         # 3: the learning rate
ex $L finetune --lr 1e-2 --seed $S --run $R
mkdir -p $R-trap && cp $R/lm.pt $R/disc.pt $R-trap/                                 # 4: the dropout trap
sed 's/finetune_loss(log_q, y, torch.log_softmax(logits, -1), log_q0, s, kl_weight)/finetune_loss(log_q, y, log_q, log_q0, s, kl_weight)/' lmdisc.py > trap-$T-$S.py
grep -c "finetune_loss(log_q, y, log_q, log_q0" trap-$T-$S.py
ex python trap-$T-$S.py finetune --lr 1e-2 --seed $S --run $R-trap
rm trap-$T-$S.py
ex $L analyze --run $R --finetune $R/finetune-lr-0.01                               # 5: baselines at 1e-2
ex $L train-disc --arch constant --seed $S --run $R                                 # 7: the s = 0 control
ex $L finetune --lr 1e-2 --disc $R/disc-arch-constant.pt --seed $S --run $R
