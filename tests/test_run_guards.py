"""The GPU job's guards, shown on the CPU: rollouts dealt across ranks by length, the sampler
checked against the student (a sampler that skipped its weight sync stops the run), and a resume
from an older checkpoint that leaves no step twice in log.jsonl."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, make_checkpoint

from fsdp import deal

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mini_bench.jsonl")


def test_deal_evens_out_a_skewed_batch():
    # two prompts' samples, as rank 0 and rank 1 drew them: rank 0 holds both long responses
    lengths = [900, 880, 30, 20, 40, 10, 25, 15]
    owner = deal(lengths, 2)
    load = [sum(n for n, r in zip(lengths, owner) if r == k) for k in (0, 1)]
    # by hand, each to the lighter rank: 900 -> 0, 880 -> 1, 40 -> 1 (920), 30 -> 0 (930),
    # 25 -> 1 (945), 20 -> 0 (950), 15 -> 1 (960), 10 -> 0 (960)
    assert owner == [0, 1, 0, 0, 1, 0, 1, 1] and load == [960, 960]
    assert max(load) / (sum(load) / 2) == 1.0
    assert max(900 + 880 + 30 + 20, 90) / (sum(lengths) / 2) > 1.8
    assert deal([5, 5, 5], 2) == [0, 1, 0]  # ties: fewer sequences, then the lower rank
    assert sorted(deal([7] * 8, 4)) == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    return (make_checkpoint(root / "teacher", "qwen3", seed=3),
            make_checkpoint(root / "student", "qwen3", seed=4))


def distill_args(pair, out, **kw):
    teacher, student = pair
    args = dict(student=student, teacher=teacher, out_dir=str(out), prompts=FIXTURE,
                backend="torch", device="cpu", prompts_per_step=2, n_samples=2, max_new_tokens=8,
                max_prompt_len=256, layers="all", max_steps=3, lr=3e-2, warmup_frac=0.0, seed=0)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def distill_runner(main, monkeypatch, capsys, **defaults):
    """run(pair, out, **kw): main() (settings_restored's) in this process with distill_args and
    defaults, overridden by kw; returns (exit status, stderr lines)."""
    from test_bad_input import main_in_process

    def run(pair, out, **kw):
        argv = ["distill.py"] + distill_args(pair, out, **{**defaults, **kw})
        code, _, err = main_in_process(main, argv, monkeypatch, capsys)
        return code, err
    return run


@pytest.fixture
def distill(settings_restored, monkeypatch, capsys):
    """distill(pair, out, **kw): distill.main() in this process; returns (exit status, stderr
    lines)."""
    return distill_runner(settings_restored.main, monkeypatch, capsys)


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# opd_full's check reads its loss's log-probs (FullKL)
@pytest.mark.parametrize("method", ["oprd", "opd_full"])
def test_sampler_gap_is_small_and_a_skipped_sync_stops_the_run(pair, tmp_path, distill,
                                                               monkeypatch, method):
    # half the 32 tokens a step
    code, err = distill(pair, tmp_path / "ok", method=method, check_tokens=16)
    assert code == 0, err[-40:]
    gaps = [r["sampler_logp_gap"] for r in log(tmp_path / "ok")]
    assert len(gaps) == 3 and max(gaps) < 1e-3  # both fp32 on the CPU: only rounding apart
    # a sampler that keeps its first weights: after one update at this rate the student has moved
    # far from it
    import sampler
    monkeypatch.setattr(sampler.TorchSampler, "update_weights", lambda self, named: None)
    code, err = distill(pair, tmp_path / "stale", method=method, check_tokens=16)
    assert code == 1 and len(err) == 1 and "step 1: stale sampler weights" in err[0], err[-40:]
    rows = log(tmp_path / "stale")
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["sampler_logp_gap"] > 10 * max(rows[0]["sampler_logp_gap"], 0.01)


def test_resume_from_an_older_checkpoint_logs_each_step_once(pair, tmp_path, distill):
    out = tmp_path / "o"
    code, err = distill(pair, out, max_steps=4, save_every=2, keep_checkpoints=2)
    assert code == 0, err[-40:]
    first = log(out)
    import shutil
    # back to the checkpoint after step 2: steps 2 and 3 run again
    shutil.rmtree(out / "step_0000004")
    code, err = distill(pair, out, max_steps=4, save_every=2, keep_checkpoints=2,
                        init_from="resume")
    assert code == 0, err[-40:]
    rows = log(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # the kept records are the old ones
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in first[:2]]


def test_eval_vllm_on_two_ranks_ends_cleanly_and_draws_what_one_rank_draws(
        tmp_path, tiny_qwen3, settings_restored, monkeypatch, capsys):
    """vLLM's teardown destroys the process group it shares with eval.py: the ranks must still exit
    0. Each problem's samples are seeded by its index in the set, so 2 ranks with one problem per
    batch draw, at temperature 1, exactly the texts 1 rank (in this process) draws with every
    problem in one batch."""
    import eval as ev
    from test_bad_input import main_in_process
    args = ["eval.py", f"--ckpt={tiny_qwen3}", f"--benchmarks={FIXTURE}", "--n_samples=2",
            "--max_new_tokens=6", "--temperature=1.0", "--backend=vllm", "--device=cpu"]
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = subprocess.run(cmd + args + ["--batch_problems=1", f"--out={two}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=400,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Process group cannot be None" not in p.stderr
    one = tmp_path / "one"
    code, _, err = main_in_process(ev.main, args + ["--batch_problems=32", f"--out={one}"],
                                   monkeypatch, capsys)
    assert code == 0, err[-40:]
    texts = {}
    for name, out in (("one", one), ("two", two)):
        with open(out / "samples.jsonl") as f:
            texts[name] = {r["id"]: r["text"] for r in map(json.loads, f)}
    with open(FIXTURE) as f:
        # both ranks' problems gathered
        assert len(texts["two"]) == 2 * sum(1 for line in f if line.strip())
    assert texts["one"] == texts["two"]
    # sampled, not the same text everywhere
    assert len(set(texts["one"].values())) > len(texts["one"]) // 2


def test_eval_samples_do_not_depend_on_ranks_or_batches(tmp_path, tiny_qwen3, settings_restored,
                                                        monkeypatch, capsys):
    """Every problem's samples are seeded by its index in the set: 1 rank (in this process) with
    every problem in one batch and 2 ranks with one problem per batch draw the same texts (torch
    backend, temperature 1), and rank 0 gathers every problem of both ranks into the same
    summary."""
    import eval as ev
    from test_bad_input import main_in_process
    texts, summaries = {}, {}
    for name, batch in (("one", 32), ("two", 1)):
        out = tmp_path / name
        args = ["eval.py", f"--ckpt={tiny_qwen3}", f"--benchmarks={FIXTURE}", "--n_samples=3",
                "--max_new_tokens=10", "--temperature=1.0", "--backend=torch", "--device=cpu",
                f"--batch_problems={batch}", f"--out={out}"]
        if name == "one":
            code, _, err = main_in_process(ev.main, args, monkeypatch, capsys)
            assert code == 0, err[-40:]
        else:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2"]
            p = subprocess.run(torchrun + args, cwd=ROOT, capture_output=True, text=True,
                               timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
            assert p.returncode == 0, p.stderr[-3000:]
        with open(out / "samples.jsonl") as f:
            texts[name] = {r["id"]: r["text"] for r in map(json.loads, f)}
        with open(out / "summary.json") as f:
            summaries[name] = json.load(f)
    with open(FIXTURE) as f:
        n_problems = sum(1 for line in f if line.strip())
    assert texts["one"] == texts["two"] and len(texts["two"]) == 3 * n_problems
    assert summaries["one"] == summaries["two"]
    assert [s["n_problems"] for s in summaries["two"].values()] == [n_problems]
    # sampled, not the same text everywhere
    assert len(set(texts["one"].values())) > len(texts["one"]) // 2


def test_a_vllm_engine_that_skips_its_sync_stops_the_run(pair, tmp_path, distill, monkeypatch):
    """The same guard with vLLM's CPU build (its engine in this process): an engine that keeps its
    first weights is caught at step 1."""
    import rollout
    monkeypatch.setattr(rollout.VLLMSampler, "update_weights", lambda self, named: 0)
    code, err = distill(pair, tmp_path / "stale", backend="vllm", max_steps=2)
    assert code == 1
    # vLLM's engine writes its own lines around ours
    err = [line for line in err if line.startswith("error:")]
    assert len(err) == 1 and "step 1: stale sampler weights" in err[0], err
    rows = log(tmp_path / "stale")
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["sampler_logp_gap"] < 1e-3
