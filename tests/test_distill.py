"""distill.py end to end: two ranks with one idle, a kill during saves, what the teacher
computes, NaN steps. The update's numbers are pinned in test_step.py (every method, one process) and
test_scale.py (two ranks)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# distill.py with each rank's record (+ its folder)
RANKS = TORCHRUN + [os.path.join("tests", "distill_ranks.py")]
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mini_bench.jsonl")


def base_args(pair, out, **kw):
    teacher, student = pair
    args = dict(student=student, teacher=teacher, out_dir=str(out), prompts=FIXTURE,
                backend="torch", device="cpu", prompts_per_step=4, n_samples=2, max_new_tokens=8,
                max_prompt_len=256, layers="all", positions="last_k", k_positions=4, max_steps=2,
                micro_batch_size=3, lr=1e-3, warmup_frac=0.0, save_every=100, seed=0)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def run(cmd, timeout=300, ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if ok and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_two_ranks_one_idle_equal_one_process(wide_pair, tmp_path, settings_restored,
                                              monkeypatch):
    """One prompt a step, so rank 1 never samples and trains on nothing (it pads), yet receives
    every weight update and joins the projector's least-squares start with no rows. Rollouts, the
    projector's start and the losses equal one process (step 1's rollouts would not if rank 0's
    sampler kept the starting weights). An idle rank's vLLM engine: test_rollout_vllm.py's
    two-rank test."""
    from distill_ranks import in_process, records
    common = dict(method="oprd", projector=True, projector_init="lstsq", temperature=0.0,
                  prompts_per_step=1, n_samples=1, max_steps=2)
    run(RANKS + [str(tmp_path / "rec")] + base_args(wide_pair, tmp_path / "two", **common))
    one = in_process(monkeypatch, settings_restored,
                     base_args(wide_pair, tmp_path / "one", **common))
    ranks = records(tmp_path / "rec")
    for step in (0, 1):
        assert ranks[0]["steps"][step]["seqs"] == one["steps"][step]["seqs"]
        assert ranks[1]["steps"][step]["seqs"] == []
        assert ranks[1]["steps"][step]["calls"] == 1  # the filler
    # fit on rank 0's rows alone, as one process fits them
    for l, w in one["proj_start"].items():
        torch.testing.assert_close(ranks[1]["proj_start"][l], w, rtol=1e-4, atol=1e-6)
    a, b = log(tmp_path / "two"), log(tmp_path / "one")
    assert [r["step"] for r in a] == [0, 1] and a[0]["loss"] != a[1]["loss"]
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-5)
    # step 1: the projector's first step came from a ~0 gradient (the least-squares start is the
    # optimum on step 0's rows), which Adam's g / (|g| + eps) makes differ in a few elements between
    # any two runs
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], rel=1e-3)
    assert all(r["sequences"] == 1 and r["sampler_logp_gap"] < 1e-3 for r in a)
    load_hf(os.path.join(tmp_path, "two", "step_0000002"))


def test_kill_during_saves_leaves_a_loadable_checkpoint(pair, tmp_path, settings_restored,
                                                        monkeypatch):
    """kill -9 while checkpoints are being written every step: the newest complete one still loads,
    and the run resumes from it."""
    out = tmp_path / "out"
    cmd = [sys.executable, "distill.py"] + base_args(pair, out, method="oprd", max_steps=50,
                                                     save_every=1, keep_checkpoints=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    from model import checkpoints_in
    deadline = time.time() + 240
    while len(checkpoints_in(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.15)  # somewhere inside the next step or save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    found = checkpoints_in(out)
    assert found, "no checkpoint was written before the kill"
    load_hf(found[-1])
    step = torch.load(os.path.join(found[-1], "resume.pt"), weights_only=True)["step"]
    assert step == int(found[-1][-7:])
    resume_args = base_args(pair, out, method="oprd", max_steps=50, save_every=1,
                            init_from="resume", stop_step=step + 1)
    monkeypatch.setattr(sys, "argv", ["distill.py"] + resume_args)
    settings_restored.main()
    assert checkpoints_in(out)[-1].endswith(f"step_{step + 1:07d}")
    assert log(out)[-1]["step"] == step


def test_oprd_teacher_runs_no_head_and_no_blocks_above_the_deepest_tap(
        pair, tmp_path, settings_restored, monkeypatch):
    """In-process run with hooks on the teacher: layers=1 means block 0 only, no final norm, no LM
    head."""
    from model import Transformer
    distill = settings_restored
    teacher, student = pair
    calls = {"teacher": [], "student_head": 0}
    real = Transformer.from_pretrained.__func__
    loaded = []

    def spy(cls, path, *a, **kw):
        m = real(cls, path, *a, **kw)
        loaded.append(path)
        if os.path.samefile(path, teacher):
            for i, blk in enumerate(m.model.layers):
                blk.register_forward_hook(lambda mod, inp, o, i=i: calls["teacher"].append(i))
            m.model.norm.register_forward_hook(lambda *a: calls["teacher"].append("norm"))
            m.lm_head.register_forward_hook(lambda *a: calls["teacher"].append("head"))
        elif len(loaded) == 1:  # distill's student (the torch sampler loads its own copy later)
            def head_hook(*a):
                calls["student_head"] += 1
            m.lm_head.register_forward_hook(head_hook)
        return m

    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(spy))
    args = base_args(pair, tmp_path / "o", method="oprd", layers="1")
    monkeypatch.setattr(sys, "argv", ["distill.py"] + args)
    distill.main()
    assert calls["teacher"] and set(calls["teacher"]) == {0}
    assert calls["student_head"] == 0


def test_non_finite_steps_are_skipped_then_stop_the_run(pair, tmp_path, settings_restored,
                                                        monkeypatch, capsys):
    """A NaN loss skips the step (weights unchanged); max_bad_steps of them in a row end the run."""
    distill = settings_restored
    real = distill.micro_batch_loss
    calls = {"n": 0}

    def nan_after_first_step(*a, **kw):
        loss, stats = real(*a, **kw)
        calls["n"] += 1
        # step 0 fine, then NaN
        return (loss * float("nan") if calls["n"] > 1 else loss), stats

    monkeypatch.setattr(distill, "micro_batch_loss", nan_after_first_step)
    out = tmp_path / "o"
    args = base_args(pair, out, method="oprd", max_steps=10, micro_batch_size=8, max_bad_steps=3)
    monkeypatch.setattr(sys, "argv", ["distill.py"] + args)
    with pytest.raises(SystemExit) as e:
        distill.main()
    assert e.value.code == 1
    text = capsys.readouterr()
    assert text.out.count("step skipped") == 3
    assert "3 non-finite steps in a row: stopping" in text.err
    rows = log(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert math.isfinite(rows[0]["loss"]) and not any(math.isfinite(r["loss"]) for r in rows[1:])


def test_the_weight_sync_sends_the_engine_dtype(pair, tmp_path, settings_restored, monkeypatch):
    """A bf16 engine receives bf16 tensors from the fp32 trainer, exactly the bf16 cast of the
    weights the step wrote (read back from the last checkpoint)."""
    import rollout
    from safetensors.torch import load_file
    from model import checkpoints_in
    from sampler import TorchSampler
    distill = settings_restored
    synced = []

    def bf16_sampler(backend, model_path, **engine_kw):
        sampler = TorchSampler(model_path=model_path, dtype=torch.bfloat16, device="cpu")
        update = sampler.update_weights

        def recorded_update(named_tensors):
            received = {name: t.clone() for name, t in named_tensors}
            synced.append(received)
            update(received.items())
        sampler.update_weights = recorded_update
        return sampler

    monkeypatch.setattr(rollout, "make_sampler", bf16_sampler)
    out = tmp_path / "o"
    monkeypatch.setattr(sys, "argv", ["distill.py"] + base_args(pair, out, method="oprd"))
    distill.main()
    assert len(synced) == 2
    last = synced[-1]
    assert {t.dtype for t in last.values()} == {torch.bfloat16}
    saved = load_file(os.path.join(checkpoints_in(out)[-1], "model.safetensors"))
    assert last.keys() == saved.keys()
    for name, weight in saved.items():
        assert weight.dtype == torch.float32
        assert torch.equal(last[name], weight.to(torch.bfloat16)), name
