#!/bin/bash
# The three mutations of issue 26, the whole suite under each: run in a fresh clone at /tmp/mut (ptb/ filled), with
# the unmutated lmdisc.py copied to /tmp/mut-orig.py first; output in logs/textbook/mutations.log.
cd /tmp/mut
mut() { python - "$1" "$2" <<'PY'
import sys
s=open('/tmp/mut-orig.py').read(); a,b=sys.argv[1],sys.argv[2]
assert s.count(a)==1, a; open('lmdisc.py','w').write(s.replace(a,b))
PY
}
echo "== A: the KL term's input detached inside finetune_loss"
mut '    kl = reverse_kl(log_q_kl, log_q0, s).mean()' '    kl = reverse_kl(log_q_kl.detach(), log_q0, s).mean()'; OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider 2>&1 | grep -E "^FAILED|passed|failed"
echo "== B: the KL term reading the CE pass"
mut 'loss, ce, kl = finetune_loss(log_q, y, torch.log_softmax(logits, -1), log_q0, s, kl_weight)' 'loss, ce, kl = finetune_loss(log_q, y, log_q, log_q0, s, kl_weight)'; OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider 2>&1 | grep -E "^FAILED|passed|failed"
echo "== C: the dropout-free pass starting from the CE pass's state"
mut 'logits, hidden["q_kl"] = q(x, detach(hidden["q_kl"]))' 'logits, hidden["q_kl"] = q(x, detach(hidden["q"]))'; OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider 2>&1 | grep -E "^FAILED|passed|failed"
cp /tmp/mut-orig.py lmdisc.py
echo "== none"; OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider 2>&1 | tail -n 1
