#!/bin/bash
# Ctrl-C / SIGTERM / SIGKILL during each phase of `pipeline`, then the same command (run as /tmp/hand/signals.sh; dfl is
# its launcher, which gives the background job a default SIGINT as a terminal would).
# Ctrl-C during phase 1, SIGTERM during phase 2, SIGKILL during phase 3 of `pipeline` (tiny, PTB), each followed by the
# same command; the final table against the uninterrupted one. Fresh clone, one thread. Usage:
#   bash signals.sh [CLONE_FOLDER] [SIGNAL_IN_PHASE_1 SIGNAL_IN_PHASE_2 SIGNAL_IN_PHASE_3]
set -um   # job control: a background job keeps Ctrl-C (bash ignores SIGINT in background jobs otherwise)
R=${1:-/tmp/fc}; rm -rf $R; git clone -q /work/main $R; cd $R; cp /work/shared/ptb/ptb.*.txt ptb/
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
interrupt() {  # $1 signal, $2 pattern in the output after which to send it
  /tmp/hand/dfl python lmdisc.py pipeline > /tmp/hand/out.$(basename $R).$1 2>&1 &
  pid=$!
  until grep -q "$2" /tmp/hand/out.$(basename $R).$1 2>/dev/null; do sleep 0.2; done
  sleep 0.5; kill -$1 $pid; wait $pid; echo "=== $1 after '$2': exit $?"; tail -n 2 /tmp/hand/out.$(basename $R).$1
  ls -la runs/tiny | grep -E "resume|\.tmp" ; ls -la runs/tiny/finetune 2>/dev/null | grep -E "resume|\.tmp"
}
# the order of the signals over the phases: $2 $3 $4 (default INT TERM KILL)
interrupt ${2:-INT} "train | epoch   1 | step    150"
interrupt ${3:-TERM} "train-disc | epoch   1 | step     50"
interrupt ${4:-KILL} "finetune\[kl\] | epoch   1 | step     20"
python lmdisc.py pipeline > /tmp/hand/out.$(basename $R).final 2>&1; echo "=== final: exit $?"
grep -E "resuming|up to date" /tmp/hand/out.$(basename $R).final
grep -E "^\| (base|CE)|^\| rescored|temperature|baselines" /tmp/hand/out.$(basename $R).final
find runs -name ".*tmp" -o -name "*.resume.pt"
python -c "import json; print('history', len(json.load(open('runs/tiny/lm.json'))['history']), len(json.load(open('runs/tiny/disc.json'))['history']))"

