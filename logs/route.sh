#!/bin/bash
# The paper's route on one LM, with every control (issue 27): phase 1; the LM's gap (its dropout-free perplexity on
# the text it learned on, beside valid's); phase 2 (the LSTM discriminator on the training text, and the s = 0
# control's); phase 3 over an lr grid, extended until the KL arm's best validation lies inside it; at that lr two
# more fine-tune seeds, the s = 0 control, and `analyze` (rescoring, the tempered control, the paired bootstrap).
# From the repository root, one thread per process:
#   OMP_NUM_THREADS=1 bash logs/route.sh PRESET RUN [LR ...] > logs/route/PRESET.log 2>&1
# e.g. `small-reg runs/small-reg` (about 2 hours on one AMD EPYC thread), or `medium runs/medium` on a GPU (see
# ../shared/tools/gpu-medium.md for the machine). The grid defaults to 1e-5 3e-5 1e-4 3e-4.
set -u
P=$1; R=$2; shift 2; LRS=${*:-1e-5 3e-5 1e-4 3e-4}
L="python lmdisc.py"
ex() { echo; echo "=== $*"; "$@"; echo "=== rc $?"; }
folder() { python -c "import sys; lr = float(sys.argv[1]); print('finetune' if lr == 1e-4 else f'finetune-lr-{lr:.15g}')" "$1"; }
kl_valid() { python -c "import json, sys; print(json.load(open(sys.argv[1]))['arms']['kl']['valid_ppl'])" "$R/$(folder "$1")/finetune.json"; }

ex $L train --preset $P --run $R
ex $L evaluate --checkpoint $R/lm.pt                                      # the gap: learned-on text against valid
ex $L train-disc --preset $P --run $R                                     # the paper's: LSTM, the training text
ex $L train-disc --preset $P --run $R --arch constant                     # s = s0 everywhere: p_hat = q0
for lr in $LRS; do ex $L finetune --preset $P --run $R --lr $lr; done
# extend the grid until the KL arm's best validation is not at an edge (at most two steps each way)
for side in low high low high; do
  sorted=$(for lr in $LRS; do echo "$lr $(kl_valid $lr)"; done | sort -g -k1)
  best=$(echo "$sorted" | sort -g -k2 | head -1 | cut -d' ' -f1)
  lo=$(echo "$sorted" | head -1 | cut -d' ' -f1); hi=$(echo "$sorted" | tail -1 | cut -d' ' -f1)
  if [ "$side" = low ] && [ "$best" = "$lo" ]; then new=$(python -c "print(f'{$lo / (10 / 3 if str($lo)[0] == \"1\" else 3):.0e}')")
  elif [ "$side" = high ] && [ "$best" = "$hi" ]; then new=$(python -c "print(f'{$hi * (3 if str($hi)[0] == \"1\" else 10 / 3):.0e}')")
  else continue; fi
  ex $L finetune --preset $P --run $R --lr $new; LRS="$LRS $new"
done
echo; echo "=== grid (lr, CE + KL's valid ppl):"; for lr in $LRS; do echo "$lr $(kl_valid $lr)"; done | sort -g -k1
best=$(for lr in $LRS; do echo "$lr $(kl_valid $lr)"; done | sort -g -k2 | head -1 | cut -d' ' -f1)
echo "=== chosen on validation: lr $best"
for seed in 2 3; do ex $L finetune --preset $P --run $R --lr $best --seed $seed; done
ex $L finetune --preset $P --run $R --lr $best --disc $R/disc-arch-constant.pt
for f in $(folder $best) $(folder $best)-seed-2 $(folder $best)-seed-3 $(folder $best)-disc-arch-constant; do
  ex $L analyze --run $R --finetune $R/$f
done
