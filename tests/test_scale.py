"""distill.py at scale's traps, on CPU: uneven shares across ranks, a used out_dir, resume state, tensor parallel
groups. Each would hang, destroy a run or run code at scale; here each works or stops with one line."""

import os
import sys

import pytest
import torch
from test_distill import TORCHRUN, base_args, log, pair, run  # noqa: F401  (pair is a fixture)

from model import checkpoints_in


def one_line_error(p, message):
    assert p.returncode != 0
    err = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], p.stderr[-3000:]


@pytest.mark.parametrize("extra", [
    dict(prompts_per_step=3, micro_batch_size=2),   # rank 0: 2 prompts = 2 micro-batches, rank 1: one
    dict(prompts_per_step=1, micro_batch_size=1),   # rank 1 has no prompt at all
])
def test_uneven_shares_do_not_hang(pair, tmp_path, extra):
    """FSDP2's collectives pair up only if every rank runs as many forwards and backwards: the short rank pads
    with zero-weight micro-batches. A hang is a timeout here."""
    out = tmp_path / "out"
    run(TORCHRUN + ["distill.py"] + base_args(pair, out, method="opd_topk+oprd", topk=4, **extra), timeout=240)
    rows = log(out)
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["sequences"] == extra["prompts_per_step"] * 2 for r in rows)  # n_samples = 2, each counted once


def test_padding_does_not_change_the_update(pair, tmp_path):
    """The same 3 prompts on 2 ranks (uneven, padded) and in one process give the same loss and gradient."""
    common = dict(method="opd+oprd", temperature=0.0, max_steps=1, prompts_per_step=3, micro_batch_size=1)
    run(TORCHRUN + ["distill.py"] + base_args(pair, tmp_path / "w2", **common), timeout=240)
    run([sys.executable, "distill.py"] + base_args(pair, tmp_path / "w1", **common))
    a, b = log(tmp_path / "w2")[0], log(tmp_path / "w1")[0]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_tensor_parallel_group_trains_each_rollout_once(pair, tmp_path):
    """tensor_parallel_size=2 on 2 ranks: both ranks sample the group's prompts, each trains on half."""
    out = tmp_path / "out"
    run(TORCHRUN + ["distill.py"] + base_args(pair, out, tensor_parallel_size=2, prompts_per_step=4), timeout=240)
    assert all(r["sequences"] == 8 for r in log(out))


def test_used_out_dir_is_refused_and_pruning_keeps_the_newest(pair, tmp_path):
    out = tmp_path / "out"
    run([sys.executable, "distill.py"] + base_args(pair, out, max_steps=3, save_every=1, keep_checkpoints=2))
    assert [os.path.basename(c) for c in checkpoints_in(out)] == ["step_0000002", "step_0000003"]
    before = sorted(os.listdir(out))
    p = run([sys.executable, "distill.py"] + base_args(pair, out, max_steps=1), ok=False)
    one_line_error(p, f"out_dir {str(out)!r} holds another run")
    assert "--init_from=resume" in p.stderr and "another --out_dir" in p.stderr
    assert sorted(os.listdir(out)) == before


def test_resume_state_is_tensors_only_and_checked(pair, tmp_path):
    out = tmp_path / "out"
    common = dict(max_steps=4, save_every=2, stop_step=2)
    run([sys.executable, "distill.py"] + base_args(pair, out, **common))
    state = torch.load(os.path.join(out, "step_0000002", "resume.pt"), weights_only=True)
    assert state["config"]["method"] == "oprd" and state["world"] == 1 and state["step"] == 2
    # another method, layer set or world size: refused before any work
    p = run([sys.executable, "distill.py"] + base_args(pair, out, init_from="resume", method="opd", **common), ok=False)
    one_line_error(p, "cannot resume")
    p = run(TORCHRUN + ["distill.py"] + base_args(pair, out, init_from="resume", **common), ok=False)
    assert p.returncode != 0 and "world=2" in p.stderr
    # another learning rate: printed, and the run goes on
    p = run([sys.executable, "distill.py"] + base_args(pair, out, init_from="resume", lr=5e-4, max_steps=4))
    assert "resuming with changed settings" in p.stdout and "lr 0.001 -> 0.0005" in p.stdout
    assert [r["step"] for r in log(out)] == [0, 1, 2, 3]
    # a truncated resume.pt: one line
    path = os.path.join(checkpoints_in(out)[-1], "resume.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    p = run([sys.executable, "distill.py"] + base_args(pair, out, init_from="resume", max_steps=6), ok=False)
    one_line_error(p, "corrupt or missing resume state")
