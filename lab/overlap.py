"""
lab/bench.py's async section: distill.py's colocated loop against sampler ranks, on the same cores,
from tiny.py's shipped pair (config/tiny.py's OPRD, the torch sampler).

- colocated: one process, `async_threads` threads, sampling then training each step
  (off_policy_steps=0, today's loop);
- split: torchrun with 1 trainer rank + 1 sampler rank (rollout_ranks=1, one step behind), the
  threads shared out, so the sampler draws step t+1's rollouts while the trainer trains step t.

Per run: the median seconds per step over the steps after the first two (the warm-up), and where
they go. For the split run also how long each side waits each step: the trainer for the rollouts
(its time/rollout) and the sampler for the trainer (its sampler/wait_s: handing over its rollouts,
then the new weights' header). The ratio is colocated over split seconds per step.

$ python -m lab.bench --sections=async
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import tiny

# the repository: distill.py is there
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the first steps start the processes' allocators and caches
WARM_UP_STEPS = 2


def distill_command(ranks, out_dir, steps, extra):
    """distill.py on tiny.py's shipped pair, in one process or under torchrun with `ranks`."""
    args = ["distill.py", "config/tiny.py", f"--student={tiny.model_path('student')}",
            f"--teacher={tiny.model_path('teacher')}", f"--out_dir={out_dir}",
            "--backend=torch", f"--max_steps={steps}", "--save_every=100000", *extra]
    if ranks == 1:
        return [sys.executable] + args
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}"] + args


def timed_run(ranks, threads, steps, extra):
    """One run's log.jsonl records, each process on `threads` threads."""
    out_dir = tempfile.mkdtemp(prefix="oprd_async_")
    try:
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
        p = subprocess.run(distill_command(ranks, out_dir, steps, extra), cwd=ROOT, env=env,
                           capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"distill.py failed: {p.stderr.strip().splitlines()[-1:]}")
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            return [json.loads(line) for line in f]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def medians(records, keys):
    """The median of each key over the steps after the warm-up."""
    timed = records[WARM_UP_STEPS:]
    return {k: statistics.median(r[k] for r in timed) for k in keys if k in timed[0]}


def bench_async(cfg, device):
    threads = cfg["async_threads"]
    steps = cfg["async_steps"]
    parts = [f"time/{k}" for k in ("rollout", "teacher", "student", "optimizer", "sync",
                                   "log_ckpt", "rest")]
    colocated = medians(timed_run(1, threads, steps, ["--off_policy_steps=0"]),
                        ["time/step", *parts])
    print(f"async: colocated, 1 process x {threads} threads: {colocated['time/step']:.3f} s a "
          f"step (rollout {colocated['time/rollout']:.3f} s)", flush=True)
    split_threads = max(1, threads // 2)
    split = medians(timed_run(2, split_threads, steps, ["--rollout_ranks=1"]),
                    ["time/step", *parts, "sampler/sample_s", "sampler/wait_s"])
    ratio = colocated["time/step"] / split["time/step"]
    print(f"async: 1 trainer + 1 sampler rank, {split_threads} thread(s) each: "
          f"{split['time/step']:.3f} s a step; the trainer waits {split['time/rollout']:.3f} s "
          f"for rollouts, the sampler draws for {split['sampler/sample_s']:.3f} s and waits "
          f"{split['sampler/wait_s']:.3f} s; {ratio:.2f}x the colocated step", flush=True)
    return dict(steps=steps, warm_up_steps=WARM_UP_STEPS, threads=threads,
                split_threads_each=split_threads, colocated=colocated, split=split,
                speedup=ratio)
