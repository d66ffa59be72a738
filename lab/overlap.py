"""
lab/bench.py's async section: distill.py's colocated loop against sampler ranks, on the same cores,
from tiny.py's shipped pair (config/tiny.py's OPRD, the torch sampler), at each number of prompts a
step in `async_prompts_per_step` (config/tiny.py's 32, where training is most of a step, and 8,
where the two sides take about the same time on one thread). At each:

- colocated: one process, `async_threads` threads, sampling then training each step
  (off_policy_steps=0, today's loop);
- colocated again on one side's share of the threads: how much faster each side runs on all of
  them, and from that the most any split could give here (overlap_bound);
- split: torchrun with 1 trainer rank + 1 sampler rank (rollout_ranks=1, one step behind), the
  threads shared out, so the sampler draws step t+1's rollouts while the trainer trains step t;
  and how much slower each side's own work runs beside the other than alone (contention).

The three runs go in turn, `async_rounds` times: each figure is the median over every round's steps
after the first two of a run (the warm-up), as the cores' speed drifts from minute to minute. Per
run, the seconds per step and where they go. For the split run also how long each side waits each
step: the trainer for the rollouts (its time/rollout) and the sampler for the trainer (its
sampler/wait_s: handing over its rollouts, then the new weights' header). The ratio is colocated
over split seconds per step.

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


def medians(timed, keys):
    """The median of each key over the timed steps' records."""
    return {k: statistics.median(r[k] for r in timed) for k in keys if k in timed[0]}


# what each step's time/ parts are (distill.py's StepClock); time/rollout is the sampling
PARTS = [f"time/{k}" for k in ("rollout", "teacher", "student", "optimizer", "sync", "log_ckpt",
                               "rest")]
# the trainer's own work in a step, without the sampler check and the hand-overs
TRAINING = ("time/teacher", "time/student", "time/optimizer")


def colocated_args(extra):
    """The colocated loop's arguments: on-policy, as today's loop."""
    return ["--off_policy_steps=0", *extra]


def colocated_medians(records):
    """The colocated loop's medians of the step and its parts, and the step split into its sampling
    (time/rollout) and its training (the rest)."""
    run = medians(records, ["time/step", *PARTS])
    run["sampling"] = run["time/rollout"]
    run["training"] = run["time/step"] - run["time/rollout"]
    return run


def overlap_bound(wide, narrow):
    """What overlap could give on these cores, from the colocated loop on all the threads (wide)
    and on a side's share of them (narrow): each side's speed-up from the extra threads, and the
    colocated step over a split step that costs nothing but its slower side on its share, at this
    workload and at the workload where both sides take the same time (the best balance: there the
    ratio is 1 / sampling speed-up + 1 / training speed-up)."""
    sampling_speedup = narrow["sampling"] / wide["sampling"]
    training_speedup = narrow["training"] / wide["training"]
    slower_side = max(narrow["sampling"], narrow["training"])
    return dict(sampling_speedup=sampling_speedup, training_speedup=training_speedup,
                here=wide["time/step"] / slower_side,
                balanced=1 / sampling_speedup + 1 / training_speedup)


def contention(split, narrow):
    """How much longer each side's own work takes in the split run, where the other side runs on
    the other cores, than in the colocated loop on the same threads, where it runs alone: the
    trainer's forwards, backwards and optimizer step, and the sampler's drawing."""
    alone = sum(narrow[k] for k in TRAINING)
    return dict(training=sum(split[k] for k in TRAINING) / alone,
                sampling=split["sampler/sample_s"] / narrow["sampling"])


def workload(threads, steps, rounds, prompts_per_step):
    """The three runs at one number of prompts a step, `rounds` times in turn (the cores' speed
    drifts: each figure is the median over every round's timed steps), and what they show."""
    extra = [f"--prompts_per_step={prompts_per_step}"]
    split_threads = max(1, threads // 2)
    runs = dict(colocated=(1, threads, colocated_args(extra)),
                narrow=(1, split_threads, colocated_args(extra)),
                split=(2, split_threads, ["--rollout_ranks=1", *extra]))
    timed = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (ranks, run_threads, args) in runs.items():
            timed[name] += timed_run(ranks, run_threads, steps, args)[WARM_UP_STEPS:]
    colocated = colocated_medians(timed["colocated"])
    narrow = colocated_medians(timed["narrow"])
    split = medians(timed["split"], ["time/step", *PARTS, "sampler/sample_s", "sampler/wait_s"])
    bound = overlap_bound(colocated, narrow)
    slower = contention(split, narrow)
    ratio = colocated["time/step"] / split["time/step"]
    head = f"async, {prompts_per_step} prompts a step:"
    print(f"{head} colocated, 1 process x {threads} threads: {colocated['time/step']:.3f} s a "
          f"step (rollout {colocated['sampling']:.3f} s, training {colocated['training']:.3f} s)")
    print(f"{head} colocated, 1 process x {split_threads} thread(s): {narrow['time/step']:.3f} s "
          f"a step (rollout {narrow['sampling']:.3f} s, training {narrow['training']:.3f} s): "
          f"{threads} threads sample {bound['sampling_speedup']:.2f}x and train "
          f"{bound['training_speedup']:.2f}x as fast; a split that cost nothing would give "
          f"{bound['here']:.2f}x here, {bound['balanced']:.2f}x where both sides take the same "
          "time")
    print(f"{head} 1 trainer + 1 sampler rank, {split_threads} thread(s) each: "
          f"{split['time/step']:.3f} s a step; the trainer waits {split['time/rollout']:.3f} s "
          f"for rollouts, the sampler draws for {split['sampler/sample_s']:.3f} s and waits "
          f"{split['sampler/wait_s']:.3f} s; beside each other training takes "
          f"{slower['training']:.2f}x and sampling {slower['sampling']:.2f}x as long as alone; "
          f"{ratio:.2f}x the colocated step", flush=True)
    return dict(prompts_per_step=prompts_per_step, colocated=colocated,
                colocated_narrow=narrow, bound=bound, split=split, contention=slower,
                speedup=ratio)


def bench_async(cfg, device):
    threads = cfg["async_threads"]
    steps = cfg["async_steps"]
    rounds = cfg["async_rounds"]
    loads = [int(n) for n in str(cfg["async_prompts_per_step"]).split(",")]
    return dict(steps=steps, warm_up_steps=WARM_UP_STEPS, rounds=rounds, threads=threads,
                split_threads_each=max(1, threads // 2),
                workloads=[workload(threads, steps, rounds, n) for n in loads])
