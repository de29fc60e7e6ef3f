#!/bin/bash
# The nine FAILs of issue 26, by hand, in a fresh clone (tiny preset on a copy of PTB in another folder; one thread).
set -um   # job control: a background job keeps Ctrl-C (bash ignores SIGINT in background jobs otherwise)
rm -rf /tmp/ff; git clone -q /work/main /tmp/ff; cd /tmp/ff
export OMP_NUM_THREADS=1
mkdir -p /tmp/ff-data && cp /work/shared/ptb/ptb.*.txt /tmp/ff-data/
L="python lmdisc.py"
say() { echo; echo "### $*"; }
run() { echo "\$ $*"; "$@" > /tmp/hand/o 2>/tmp/hand/e; rc=$?; grep -E "up to date|^\| |error|interrupted" /tmp/hand/o | head -4; cat /tmp/hand/e | tail -n 3; echo "exit $rc"; }
$L pipeline --data /tmp/ff-data --run /tmp/ff-run > /tmp/hand/ff-pipeline.log 2>&1; echo "pipeline exit $?"
say "1. finetune after the training text changed"
cp -r /tmp/ff-data /tmp/ff-data.bak; echo "a new line" >> /tmp/ff-data/ptb.train.txt
run $L finetune --run /tmp/ff-run
rm -r /tmp/ff-data; mv /tmp/ff-data.bak /tmp/ff-data
say "2. analyze after another discriminator of the same LM is put in the run folder"
run $L train-disc --run /tmp/ff-run --seed 5
cp /tmp/ff-run/disc.pt /tmp/ff-run/disc-orig.pt; cp /tmp/ff-run/disc-seed-5.pt /tmp/ff-run/disc.pt
run $L analyze --run /tmp/ff-run
cp /tmp/ff-run/disc-orig.pt /tmp/ff-run/disc.pt; cp /tmp/ff-run/finetune/ce.pt /tmp/ff-run/ce-orig.pt
cp /tmp/ff-run/finetune/kl.pt /tmp/ff-run/finetune/ce.pt
run $L analyze --run /tmp/ff-run
cp /tmp/ff-run/ce-orig.pt /tmp/ff-run/finetune/ce.pt
say "3. train-disc --lr 1e4"
run $L train-disc --run /tmp/ff-run --lr 1e4; ls /tmp/ff-run | grep -E "lr-10000" || echo "(nothing kept)"
say "4. an unwritable --run, a read-only one, a full disk"
touch /tmp/ff-file; run $L train --data /tmp/ff-data --run /tmp/ff-file/run
mkdir -p /tmp/ro && (mountpoint -q /tmp/ro || mount -t tmpfs -o size=64k,ro tmpfs /tmp/ro) && run $L train --data /tmp/ff-data --run /tmp/ro/run
mkdir -p /tmp/full && (mountpoint -q /tmp/full || mount -t tmpfs -o size=1m tmpfs /tmp/full) && run $L train --data /tmp/ff-data --run /tmp/full/run
say "5. a resume point's size against lm.pt; temporary files after a kill"
$L train --data /tmp/ff-data --run /tmp/ff-r5 > /tmp/hand/o5 2>&1 & p=$!
until grep -q "step    100/" /tmp/hand/o5 2>/dev/null; do sleep 0.2; done; sleep 0.3; kill -9 $p; wait $p 2>/dev/null
ls -l /tmp/ff-r5 | awk '{print $5, $9}'; ls -la /tmp/ff-r5 | grep tmp || echo "(no temporary file)"
$L train --data /tmp/ff-data --run /tmp/ff-r5 > /tmp/hand/o5b 2>&1; grep resuming /tmp/hand/o5b; ls -la /tmp/ff-r5 | awk '{print $5, $9}'
say "6. Ctrl-C in a phase's last step or validation: does pipeline start the next phase?"
/tmp/hand/dfl python lmdisc.py pipeline --data /tmp/ff-data --run /tmp/ff-r6 > /tmp/hand/o6 2>&1 & p=$!
until grep -q "train | validation at step" /tmp/hand/o6 2>/dev/null; do sleep 0.05; done; kill -INT $p; wait $p; echo "exit $?"
tail -n 3 /tmp/hand/o6; grep -c "train-disc |" /tmp/hand/o6
say "7. analyze with no fine-tune; a user's lm.json; tracebacks"
mkdir -p /tmp/ff-r7 && cp /tmp/ff-run/lm.pt /tmp/ff-r7/; run $L analyze --run /tmp/ff-r7
mkdir -p /tmp/ff-r8 && echo "my notes" > /tmp/ff-r8/lm.json; run $L train --data /tmp/ff-data --run /tmp/ff-r8; cat /tmp/ff-r8/lm.json
$L make-synthetic --out /tmp/ff-syn > /dev/null; $L train --data /tmp/ff-syn --run /tmp/ff-syn-run > /dev/null 2>&1
$L train-disc --run /tmp/ff-syn-run > /dev/null 2>&1
sed -i '1s/^/w999 /' /tmp/ff-syn/ptb.train.txt; sed -i '1s/^/w999 /' /tmp/ff-syn/ptb.valid.txt
$L train --data /tmp/ff-syn --run /tmp/ff-syn-run2 > /dev/null 2>&1; $L train-disc --run /tmp/ff-syn-run2 > /dev/null 2>&1
run $L evaluate --checkpoint /tmp/ff-syn-run2/lm.pt --disc /tmp/ff-syn-run2/disc.pt
python -c "
import torch, lmdisc as L
ck = L.load_checkpoint('/tmp/ff-run/lm.pt'); ck = {k: v for k, v in ck.items() if k not in ('path', 'fingerprint', 'vocab')}
open('/tmp/ff-crafted.pt', 'wb').write(L.checkpoint_bytes(ck))"
run $L evaluate --checkpoint /tmp/ff-crafted.pt
for i in 1 2 3 4 5 6 7 8; do /tmp/hand/dfl python lmdisc.py --help > /dev/null 2>/tmp/hand/ei & p=$!; sleep 0.0$i; kill -INT $p; wait $p; echo "Ctrl-C at 0.0$i s: exit $? $(grep -c Traceback /tmp/hand/ei) tracebacks"; done
