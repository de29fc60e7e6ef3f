"""Phase 1's speed against pytorch/examples' word_language_model at `small`'s settings, side by side, A/B/B/A:
the ms/batch each prints for batches 401-600, then the run is stopped. From the repository root, with
pytorch/examples' word_language_model copied to EXAMPLES (its data/ptb/{train,valid,test}.txt the PTB files):
    OMP_NUM_THREADS=2 python logs/parity.py EXAMPLES"""
import re, subprocess, sys, tempfile
from pathlib import Path

examples = Path(sys.argv[1]).resolve()
arms = {"pytorch/examples": ([sys.executable, "main.py", "--data", "./data/ptb", "--tied", "--epochs", "1",
                              "--emsize", "200", "--nhid", "200", "--dropout", "0.2"], examples,
                             r"\|\s+600/\s*\d+ batches .*ms/batch\s+([\d.]+)"),
        "lmdisc": ([sys.executable, "lmdisc.py", "train", "--preset", "small", "--run", tempfile.mkdtemp()], Path.cwd(),
                   r"step +600/\d+ .*\|\s+([\d.]+) ms/batch")}
seen = {}
for name in ("pytorch/examples", "lmdisc", "lmdisc", "pytorch/examples"):
    cmd, cwd, pattern = arms[name]
    if name == "lmdisc":
        cmd = cmd[:-1] + [tempfile.mkdtemp()]                     # a fresh run folder each time
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if m := re.search(pattern, line):
            p.kill()
            seen.setdefault(name, []).append(float(m[1]))
            print(f"{name}: {float(m[1]):.2f} ms/batch (batches 401-600)", flush=True)
            break
    p.wait()
mean = {k: sum(v) / len(v) for k, v in seen.items()}
print(f"lmdisc at {mean['pytorch/examples'] / mean['lmdisc']:.2f}x pytorch/examples' throughput "
      f"({mean['lmdisc']:.2f} against {mean['pytorch/examples']:.2f} ms/batch on average)")
