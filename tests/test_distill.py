"""distill.py end to end: every method under torchrun (2 ranks, gloo), checkpoints, resume, errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, make_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mini_bench.jsonl")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny teacher and a student of the same architecture and tokenizer (other weights)."""
    root = tmp_path_factory.mktemp("pair")
    return make_checkpoint(root / "teacher", "qwen3", seed=3), make_checkpoint(root / "student", "qwen3", seed=4)


def base_args(pair, out, **kw):
    teacher, student = pair
    args = dict(student=student, teacher=teacher, out_dir=str(out), prompts=FIXTURE, backend="torch", device="cpu",
                prompts_per_step=4, n_samples=2, max_new_tokens=8, max_prompt_len=256, layers="all",
                positions="last_k", k_positions=4, max_steps=2, micro_batch_size=3, lr=1e-3, warmup_frac=0.0,
                save_every=100, seed=0)
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


@pytest.mark.parametrize("method", ["oprd", "opd", "opd_topk", "opd_full", "opd+oprd", "opd_topk+oprd"])
def test_each_method_two_ranks_torch_backend(pair, tmp_path, method):
    out = tmp_path / "out"
    extra = {"oprd": dict(teacher_fsdp=True), "opd_full": dict(activation_checkpointing=True)}.get(method, {})
    p = run(TORCHRUN + ["distill.py"] + base_args(pair, out, method=method, topk=4, **extra))
    rows = log(out)
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert all(isinstance(v, (int, float)) for v in r.values())
        assert r["grad_norm"] > 0 and r["mean_response_len"] > 0 and 0 <= r["trunc_rate"] <= 1
        assert r["rollout_tok_s"] > 0 and r["update_tok_s"] > 0 and r["update_transient_mem_mb"] >= 0
        if "oprd" in method:
            assert {f"cos/{l}" for l in (1, 2, 3)} <= set(r) and {f"oprd_loss/{l}" for l in (1, 2, 3)} <= set(r)
        if method != "oprd":
            assert "kl" in r
    ck = os.path.join(out, "step_0000002")
    assert os.path.isfile(os.path.join(ck, "resume.pt"))
    load_hf(ck)  # transformers loads the student checkpoint
    assert "world 2" in p.stdout


def test_oprd_two_ranks_vllm_backend(pair, tmp_path):
    out = tmp_path / "out"
    run(TORCHRUN + ["distill.py"] + base_args(pair, out, method="oprd", backend="vllm"), timeout=600)
    assert len(log(out)) == 2
    load_hf(os.path.join(out, "step_0000002"))


def test_sft_two_ranks(pair, tmp_path):
    out = tmp_path / "out"
    run(TORCHRUN + ["distill.py"] + base_args(pair, out, method="sft", prompts="tiny_train", max_steps=3))
    losses = [r["loss"] for r in log(out)]
    assert len(losses) == 3 and all(l > 0 for l in losses)


def test_world_size_two_equals_one(pair, tmp_path):
    """Greedy rollouts make both runs see the same sequences; the update must not depend on the sharding."""
    common = dict(method="opd_topk+oprd", topk=4, temperature=0.0, max_steps=1, micro_batch_size=2)
    run(TORCHRUN + ["distill.py"] + base_args(pair, tmp_path / "w2", **common))
    run([sys.executable, "distill.py"] + base_args(pair, tmp_path / "w1", **common))
    a, b = log(tmp_path / "w2")[0], log(tmp_path / "w1")[0]
    assert abs(a["loss"] - b["loss"]) < 1e-5 * max(1, abs(b["loss"]))
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1, b["grad_norm"])
    from safetensors.torch import load_file
    w2 = load_file(os.path.join(tmp_path, "w2", "step_0000001", "model.safetensors"))
    w1 = load_file(os.path.join(tmp_path, "w1", "step_0000001", "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)


def test_resume_gives_the_same_losses(pair, tmp_path):
    common = dict(method="opd+oprd", max_steps=4, save_every=2)
    run([sys.executable, "distill.py"] + base_args(pair, tmp_path / "full", **common))
    run([sys.executable, "distill.py"] + base_args(pair, tmp_path / "cut", stop_step=2, **common))
    assert [r["step"] for r in log(tmp_path / "cut")] == [0, 1]
    run([sys.executable, "distill.py"] + base_args(pair, tmp_path / "cut", init_from="resume", **common))
    full, cut = log(tmp_path / "full"), log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [0, 1, 2, 3]
    for a, b in zip(full, cut):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9), (a, b)


def test_kill_during_saves_leaves_a_loadable_checkpoint(pair, tmp_path):
    """kill -9 while checkpoints are being written every step: the newest complete one still loads."""
    out = tmp_path / "out"
    cmd = [sys.executable, "distill.py"] + base_args(pair, out, method="oprd", max_steps=50, save_every=1,
                                                     keep_checkpoints=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    torch.load(os.path.join(found[-1], "resume.pt"), weights_only=False)
    run([sys.executable, "distill.py"] + base_args(pair, out, method="oprd", max_steps=50, save_every=1,
                                                   init_from="resume", stop_step=int(found[-1][-7:]) + 1))


def test_oprd_teacher_runs_no_head_and_no_blocks_above_the_deepest_tap(pair, tmp_path, monkeypatch):
    """In-process run with hooks on the teacher: layers=1 means block 0 only, no final norm, no LM head."""
    import distill
    from model import Transformer
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
    monkeypatch.setattr(sys, "argv", ["distill.py"] + base_args(pair, tmp_path / "o", method="oprd", layers="1"))
    distill.main()
    assert calls["teacher"] and set(calls["teacher"]) == {0}
    assert calls["student_head"] == 0


@pytest.mark.parametrize("change,message", [
    (dict(method="opd_reverse"), "method='opd_reverse' does not exist"),
    (dict(layers="1,7"), "layers [7] out of range"),
    (dict(lr="fast"), "config key 'lr' expects float"),
    (dict(lerning_rate=1.0), "unknown config key 'lerning_rate'"),
    (dict(prompts="nope.jsonl"), "no such file: nope.jsonl"),
])
def test_clear_errors_before_any_work(pair, tmp_path, change, message):
    out = tmp_path / "out"
    p = run([sys.executable, "distill.py"] + base_args(pair, out, **change), ok=False)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], p.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "log.jsonl"))


def test_width_mismatch_and_tokenizer_mismatch(pair, tmp_path):
    teacher, student = pair
    wide = make_checkpoint(tmp_path / "wide", "qwen3", hidden_size=96, num_attention_heads=3, seed=5)
    p = run([sys.executable, "distill.py"] + base_args((wide, student), tmp_path / "o"), ok=False)
    assert p.returncode != 0 and "teacher width 96 != student width 64: set projector=True" in p.stderr
    # with a projector it trains; its gradients are all-reduced across ranks
    run(TORCHRUN + ["distill.py"] + base_args((wide, student), tmp_path / "o2", projector=True, max_steps=1))
    other = make_checkpoint(tmp_path / "other_tok", "qwen3", seed=6)
    # the same strings, other ids: a teacher whose token ids would differ from the student's rollouts
    vocab = json.load(open(os.path.join(other, "tokenizer.json")))
    vocab["model"]["vocab"] = {k: (v + 1) % len(vocab["model"]["vocab"]) for k, v in vocab["model"]["vocab"].items()}
    with open(os.path.join(other, "tokenizer.json"), "w") as f:
        json.dump(vocab, f)
    p = run([sys.executable, "distill.py"] + base_args((other, student), tmp_path / "o3"), ok=False)
    assert p.returncode != 0 and "tokenize differently" in p.stderr


def test_non_finite_steps_are_skipped_then_stop_the_run(pair, tmp_path, monkeypatch, capsys):
    """A NaN loss skips the step (weights unchanged); max_bad_steps of them in a row end the run."""
    import distill
    real = distill.micro_batch_loss
    calls = {"n": 0}

    def nan_after_first_step(*a, **kw):
        loss, stats = real(*a, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 1 else loss), stats  # step 0 fine, then NaN

    monkeypatch.setattr(distill, "micro_batch_loss", nan_after_first_step)
    out = tmp_path / "o"
    monkeypatch.setattr(sys, "argv", ["distill.py"] + base_args(pair, out, method="oprd", max_steps=10,
                                                                micro_batch_size=8, max_bad_steps=3))
    with pytest.raises(SystemExit) as e:
        distill.main()
    assert e.value.code == 1
    text = capsys.readouterr()
    assert text.out.count("step skipped") == 3 and "3 non-finite steps in a row: stopping" in text.err
    rows = log(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert math.isfinite(rows[0]["loss"]) and not any(math.isfinite(r["loss"]) for r in rows[1:])
