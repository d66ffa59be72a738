"""distill.py across ranks, on CPU (gloo): two ranks train exactly as one process does, however the
step's tokens fall on the ranks; the projector is one projector; a resumed two-rank run continues
where it stopped. tests/distill_ranks.py records what each rank held. Also the traps of a long run
in one process: a used out_dir, pruning, a resume state that is tensors only and checked, a
truncated one."""

import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file
from distill_ranks import in_process, records
from test_distill import RANKS, base_args, log, run

from model import checkpoints_in


def assert_same_weights(a, b, atol=1e-4):
    """Checkpoints a and b hold the same student. Adam's first steps are lr * g / (|g| + eps),
    +-lr = 1e-3 per element whatever |g| is, except where |g| is near eps (1e-8) and rounding may
    move it: 1e-4 is a tenth of a step."""
    wa, wb = (load_file(os.path.join(x, "model.safetensors")) for x in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def assert_same_steps(rows_a, rows_b, rel=1e-5):
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        for k in [k for k in b if k == "loss" or k == "kl" or k.startswith(("oprd_loss/", "cos/"))]:
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-7), (k, a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=10 * rel), (a, b)


# -------------------------------------------------------------------------- two ranks = one process

# 3 greedy rollouts a step, dealt 1 + 2 over the ranks: the ranks hold different token and
# micro-batch counts (micro-batches of 1: the short rank runs a zero-weight filler). At two ranks
# tensor_parallel_size=2 makes both ranks sample every prompt with the seed one process uses, then
# split them, and the teacher is sharded too. The teacher is wider (d=128): a learned projector,
# started at the least-squares map of step 0's rows (the normal equations summed over the ranks),
# with the combined objective. That start must not be the optimum of the projector's own loss, or
# its first gradient is rounding noise that Adam's g / (|g| + eps) turns into steps differing
# between any two runs: so more rows (96) than the student's width (64), and normalised MSE.
TWO_RANKS = dict(method="opd_topk+oprd", topk=4, mu=10.0, projector=True, projector_init="lstsq",
                 distance="normalized_mse", positions="all", max_new_tokens=32, temperature=0.0,
                 prompts_per_step=3, n_samples=1, micro_batch_size=1, max_steps=3, save_every=1,
                 keep_checkpoints=3)


@pytest.fixture(scope="module")
def two_rank_runs(wide_pair, tmp_path_factory):
    """Two ranks, 3 steps (records in rec/), and the same run resumed at step 2 from a copy of its
    checkpoint."""
    root = tmp_path_factory.mktemp("two_rank_runs")
    p = run(RANKS + [str(root / "rec")]
            + base_args(wide_pair, root / "full", teacher_fsdp=True, tensor_parallel_size=2,
                        **TWO_RANKS))
    assert "world 2" in p.stdout
    os.makedirs(root / "cut")
    shutil.copytree(root / "full" / "step_0000002", root / "cut" / "step_0000002")
    run(RANKS + [str(root / "rec_resumed")]
        + base_args(wide_pair, root / "cut", init_from="resume", teacher_fsdp=True,
                    tensor_parallel_size=2, **TWO_RANKS))
    return root


def test_two_ranks_with_uneven_tokens_equal_one_process(two_rank_runs, wide_pair, tmp_path,
                                                        settings_restored, monkeypatch):
    """Every loss is divided by the step's counts summed over ranks, so the ranks' shares do not
    matter: losses, gradient norms and weights equal one process's. The projector is one projector:
    it starts from both ranks' rows, the ranks' own gradients of it differ, their sum is one
    process's gradient, and after each step both ranks hold one process's projector."""
    one = in_process(monkeypatch, settings_restored,
                     base_args(wide_pair, tmp_path / "w1", **dict(TWO_RANKS, stop_step=2)))
    ranks = records(two_rank_runs / "rec")
    for step, mine in enumerate(one["steps"]):
        a, b = ranks[0]["steps"][step], ranks[1]["steps"][step]
        # each rollout trained once, on one rank: together the ranks hold what one process holds
        assert sorted(a["seqs"] + b["seqs"]) == sorted(mine["seqs"]) and len(mine["seqs"]) == 3
        assert a["local_out"] != b["local_out"] and a["local_rep"] != b["local_rep"]
        # the busier rank's count
        assert a["local_micro"] != b["local_micro"] and a["calls"] == b["calls"] == 2
        assert a["local_out"] + b["local_out"] == mine["n_out"] == a["n_out"] == b["n_out"]
        assert a["local_rep"] + b["local_rep"] == mine["n_rep"] == a["n_rep"]
        for l in ("1", "2", "3"):
            g0 = ranks[0]["proj_grad"][step][l]
            g1 = ranks[1]["proj_grad"][step][l]
            g = one["proj_grad"][step][l]
            assert (g0 - g1).norm() > 0.1 * g.norm() > 0  # each rank's rows pull its own way
            torch.testing.assert_close(g0 + g1, g, rtol=1e-3, atol=1e-4 * g.abs().max().item())
            saved_0 = ranks[0]["proj_saved"][step + 1][l]
            assert torch.equal(saved_0, ranks[1]["proj_saved"][step + 1][l])
            # a tenth of an Adam step, as assert_same_weights
            torch.testing.assert_close(saved_0, one["proj_saved"][step + 1][l], rtol=0, atol=1e-4)
    # one least-squares start: both ranks' rows, as one process fits all of them
    for l in ("1", "2", "3"):
        for r in ranks:
            torch.testing.assert_close(r["proj_start"][l], one["proj_start"][l], rtol=1e-4,
                                       atol=1e-6)
        assert not torch.allclose(one["proj_saved"][1][l], one["proj_start"][l], atol=1e-4)
    rows = log(two_rank_runs / "full")
    assert_same_steps(rows[:2], log(tmp_path / "w1"))
    assert all(r["sequences"] == 3 for r in rows) and rows[0]["loss"] != rows[1]["loss"]
    # nn.Linear's random start would give ~0
    assert all(rows[0][f"cos/{l}"] > 0.5 for l in (1, 2, 3))
    assert_same_weights(two_rank_runs / "full" / "step_0000002", tmp_path / "w1" / "step_0000002")


def test_resume_at_two_ranks_continues_the_run(two_rank_runs):
    """The optimizer and projector shards reach every rank (each rank's slice of what resume.pt
    holds), and the resumed step and final weights equal the uninterrupted run's."""
    saved = torch.load(two_rank_runs / "full" / "step_0000002" / "resume.pt", weights_only=True)
    assert saved["world"] == 2 and saved["step"] == 2
    ranks = records(two_rank_runs / "rec_resumed")
    for r, rec in enumerate(ranks):
        state = rec["resumed"]["state"]
        assert state.keys() == saved["optimizer"]["state"].keys() and len(state) > 30
        for name, want in saved["optimizer"]["state"].items():
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state[name][k], torch.chunk(want[k], 2)[r], rtol=0,
                                           atol=0)
            assert state[name]["step"].item() == want["step"].item() == 2
        for l, w in rec["resumed"]["proj"].items():
            shard = torch.chunk(saved["projector"][f"{l}.weight"], 2)[r]
            torch.testing.assert_close(w, shard, rtol=0, atol=0)
    full, resumed = log(two_rank_runs / "full"), log(two_rank_runs / "cut")
    assert [r["step"] for r in resumed] == [2] and full[2]["loss"] != full[1]["loss"]
    assert_same_steps(resumed, full[2:], rel=1e-6)
    assert_same_weights(two_rank_runs / "cut" / "step_0000003",
                        two_rank_runs / "full" / "step_0000003", atol=1e-6)
    resume_pts = (two_rank_runs / x / "step_0000003" / "resume.pt" for x in ("cut", "full"))
    a, b = (torch.load(path, weights_only=True)["projector"] for path in resume_pts)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_resume_refuses_another_world_size(two_rank_runs, wide_pair, tmp_path, settings_restored,
                                           monkeypatch, capsys):
    shutil.copytree(two_rank_runs / "full", tmp_path / "o")
    argv = ["distill.py"] + base_args(wide_pair, tmp_path / "o", init_from="resume", **TWO_RANKS)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        settings_restored.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert (e.value.code == 1 and len(err) == 1 and "cannot resume" in err[0]
            and "world=1" in err[0]), err


# ------------------------------------------------------------------ one process: a long run's traps

def main_fails(distill, monkeypatch, capsys, args):
    """distill.main() must stop with exit status 1 and one line on stderr; returns that line."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["distill.py"] + args)
    with pytest.raises(SystemExit) as e:
        distill.main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 1 and len(err) == 1, err
    return err[0]


def test_used_out_dir_is_refused_and_pruning_keeps_the_newest(pair, tmp_path, settings_restored,
                                                             monkeypatch, capsys):
    out = tmp_path / "out"
    in_process(monkeypatch, settings_restored,
               base_args(pair, out, max_steps=3, save_every=1, keep_checkpoints=2))
    assert [os.path.basename(c) for c in checkpoints_in(out)] == ["step_0000002", "step_0000003"]
    before = sorted(os.listdir(out))
    err = main_fails(settings_restored, monkeypatch, capsys, base_args(pair, out, max_steps=1))
    assert f"out_dir {str(out)!r} holds another run" in err
    assert "--init_from=resume" in err and "another --out_dir" in err
    assert sorted(os.listdir(out)) == before


def test_resume_state_is_tensors_only_checked_and_gives_the_same_losses(pair, tmp_path,
                                                                      settings_restored,
                                                                      monkeypatch, capsys):
    """A run stopped at step 2 (stop_step, as if preempted) and resumed gives the losses of the run
    that was never stopped; another method or layer set is refused, another lr is printed, a
    truncated resume.pt is one line."""
    distill = settings_restored
    common = dict(method="opd+oprd", max_steps=4, save_every=2)
    in_process(monkeypatch, distill, base_args(pair, tmp_path / "full", **common))
    in_process(monkeypatch, distill, base_args(pair, tmp_path / "cut", stop_step=2, **common))
    assert [r["step"] for r in log(tmp_path / "cut")] == [0, 1]
    state = torch.load(tmp_path / "cut" / "step_0000002" / "resume.pt", weights_only=True)
    assert state["config"]["method"] == "opd+oprd" and state["world"] == 1 and state["step"] == 2
    for change in (dict(method="opd"), dict(layers="1,2")):
        err = main_fails(distill, monkeypatch, capsys,
                         base_args(pair, tmp_path / "cut", init_from="resume",
                                   **dict(common, **change)))
        assert "cannot resume" in err and f"{next(iter(change))}=" in err
    capsys.readouterr()
    in_process(monkeypatch, distill,
               base_args(pair, tmp_path / "cut", init_from="resume", **common))
    full, cut = log(tmp_path / "full"), log(tmp_path / "cut")
    assert [r["step"] for r in cut] == [0, 1, 2, 3] and full[2]["loss"] != full[3]["loss"]
    for a, b in zip(full, cut):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-9), (a, b)
    # another learning rate: printed, and the run goes on
    in_process(monkeypatch, distill, base_args(pair, tmp_path / "cut", init_from="resume",
                                               **dict(common, max_steps=5, lr=5e-4)))
    printed = capsys.readouterr().out
    assert "resuming with changed settings" in printed and "lr 0.001 -> 0.0005" in printed
    path = os.path.join(checkpoints_in(tmp_path / "cut")[-1], "resume.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    err = main_fails(distill, monkeypatch, capsys,
                     base_args(pair, tmp_path / "cut", init_from="resume",
                               **dict(common, max_steps=6)))
    assert "corrupt or missing resume state" in err
