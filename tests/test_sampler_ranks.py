"""Sampler ranks (rollout_ranks=k, ranks.py): the last k ranks only sample, the others only train.
A run with sampler ranks is, loss for loss, the colocated run with the same off_policy_steps and
seeds: at 1 trainer + 1 sampler bit for bit, at 2 trainers + 1 sampler up to the rounding of two
ranks' sums, and with vLLM's engine on the sampler rank (test_sampler_ranks_vllm.py). A resume
makes the rollouts of an uninterrupted run; a sampler rank that dies stops the run with one line
naming it; bad settings get one line before any work. All on gloo."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, make_checkpoint
from test_cross_tokenizer import permuted_copy
from test_distill import run
from test_run_guards import distill_args, distill_runner, log
from test_scale import assert_same_weights


def one_tokenizer_pair(root):
    """A teacher and a student of one tokenizer, in root."""
    return {"teacher": make_checkpoint(root / "teacher", "qwen3", seed=3),
            "student": make_checkpoint(root / "student", "qwen3", seed=4)}


def colocated_runner(settings_restored, monkeypatch, capsys):
    """go(models, out, teacher, **kw): the run in this process, every step's rollouts drawn by the
    one rank that trains."""
    run_here = distill_runner(settings_restored.main, monkeypatch, capsys)

    def go(models, out, teacher="teacher", **kw):
        code, err = run_here((models[teacher], models["student"]), out, **kw)
        assert code == 0, err[-20:]
    return go


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """one_tokenizer_pair, the teacher again under other token ids, and a wider teacher."""
    root = tmp_path_factory.mktemp("sampler_ranks")
    models = one_tokenizer_pair(root)
    teacher = models["teacher"]
    other_tokens, _ = permuted_copy(teacher, root / "teacher_permuted")
    wide = make_checkpoint(root / "wide", "qwen3", hidden_size=96, num_attention_heads=3, seed=5)
    return dict(models, other_tokens=other_tokens, wide=wide)


def torchrun(nproc, models, out, teacher="teacher", **kw):
    """distill.py under torchrun with nproc ranks; returns the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "distill.py"]
    return run(cmd + distill_args((models[teacher], models["student"]), out, **kw))


@pytest.fixture
def colocated(settings_restored, monkeypatch, capsys):
    """colocated_runner's go."""
    return colocated_runner(settings_restored, monkeypatch, capsys)


def assert_close_steps(rows_a, rows_b):
    """The same steps up to the rounding of two ranks' sums, which lr 3e-2 carries into the fifth
    digit of a near-zero cosine."""
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        for k in [k for k in b if k in ("loss", "kl", "grad_norm")
                  or k.startswith(("oprd_loss/", "cos/"))]:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a, b)


# chunk-level OPD across tokenizers, one step behind: its importance ratio, and each rollout's
# reading by the teacher crossing with it; a checkpoint at every step
ONE_PLUS_ONE = dict(method="opd_chunk", off_policy_steps=1, teacher="other_tokens", save_every=1,
                    keep_checkpoints=3)


@pytest.fixture(scope="module")
def one_plus_one(models, tmp_path_factory):
    """ONE_PLUS_ONE colocated (one process: colocated/) and with 1 trainer + 1 sampler rank
    (split/)."""
    import distill
    import startup
    from configurator import settings
    root = tmp_path_factory.mktemp("one_plus_one")
    pair = (models["other_tokens"], models["student"])
    kw = {k: v for k, v in ONE_PLUS_ONE.items() if k != "teacher"}
    # in this process, its settings put back after (settings_restored's job, for a module)
    defaults = settings(vars(distill))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["distill.py"] + distill_args(pair, root / "colocated", **kw))
        distill.main()
    vars(distill).update(defaults)
    startup.started_samplers.clear()
    p = torchrun(2, models, root / "split", rollout_ranks=1, **ONE_PLUS_ONE)
    assert "world 2 (1 train, 1 sample)" in p.stdout
    return root


def test_one_trainer_and_one_sampler_rank_are_the_colocated_run_bit_for_bit(one_plus_one):
    split, together = log(one_plus_one / "split"), log(one_plus_one / "colocated")
    assert len(split) == len(together) == 3
    for a, b in zip(split, together):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
    assert_same_weights(one_plus_one / "split" / "step_0000003",
                        one_plus_one / "colocated" / "step_0000003", atol=0)
    # the samplers' side of each step, beside the trainers' (none for step 0's, which were
    # drawn before the first step)
    for row in split:
        assert row["sampler/sample_s"] > 0 and row["sampler/wait_s"] >= 0
        assert row["rollout_tok_s"] > 0 and row["sampler_logp_gap"] < 1e-4


def test_two_trainers_and_one_sampler_rank_are_the_colocated_run(models, tmp_path, colocated):
    """OPRD one step behind over two trainers toward a wider teacher, through a projector started
    by least squares on step 0's rollouts (which the sampler hands over once, for both). As in
    test_scale.py's two-rank run: more rows than the student's width, and normalised MSE, or that
    start is the projector's optimum and Adam turns its rounding-noise gradient into steps."""
    settings = dict(method="oprd", off_policy_steps=1, teacher="wide", projector=True,
                    projector_init="lstsq", distance="normalized_mse", positions="all",
                    max_new_tokens=32, lr=1e-3, max_steps=2)
    colocated(models, tmp_path / "colocated", **settings)
    p = torchrun(3, models, tmp_path / "split", rollout_ranks=1, **settings)
    assert "world 3 (2 train, 1 sample)" in p.stdout
    assert_close_steps(log(tmp_path / "split"), log(tmp_path / "colocated"))
    assert_same_weights(tmp_path / "split" / "step_0000002",
                        tmp_path / "colocated" / "step_0000002")


def test_a_resume_with_sampler_ranks_makes_the_rollouts_of_an_uninterrupted_run(
        models, one_plus_one, tmp_path):
    """Resumed from the split run's step-2 checkpoint: it holds step 2's rollouts (drawn by the
    sampler rank with the weights after one update), the sampler rank restarts from the
    checkpoint's weights, and step 2 is bit for bit the uninterrupted run's."""
    out = tmp_path / "resumed"
    os.makedirs(out)
    shutil.copytree(one_plus_one / "split" / "step_0000002", out / "step_0000002")
    p = torchrun(2, models, out, rollout_ranks=1, init_from="resume", **ONE_PLUS_ONE)
    assert "resuming from" in p.stdout
    again, whole = log(out), log(one_plus_one / "colocated")
    assert [r["step"] for r in again] == [2]
    assert (again[0]["loss"], again[0]["grad_norm"]) == (whole[2]["loss"], whole[2]["grad_norm"])


DYING_SAMPLER = """
import os, sys
sys.path.insert(0, os.getcwd())
import distill
real = distill.rollouts


def rollouts(sampler, items, step, *args):
    if step == 2:
        os._exit(3)
    return real(sampler, items, step, *args)


distill.rollouts = rollouts
sys.argv = ["distill.py"] + sys.argv[1:]
distill.main()
"""


def test_a_sampler_rank_that_dies_stops_the_run_with_one_line(models, tmp_path):
    """Two processes started by hand (no torchrun to stop the others): the sampler rank exits
    while it draws step 2's rollouts; the trainer, waiting for them, stops with one line that
    names rank 1, and exits 1."""
    args = distill_args((models["teacher"], models["student"]), tmp_path / "out", method="opd",
                        rollout_ranks=1, max_steps=4)
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    procs = [subprocess.Popen([sys.executable, "-c", DYING_SAMPLER] + args, cwd=ROOT,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [1, 3]
    errors = [line for line in outputs[0][1].splitlines() if line.strip()]
    assert len(errors) == 1, errors
    assert errors[0].startswith("error: sampler rank 1 stopped answering"), errors
    assert "Traceback" not in outputs[0][1]


SKIPPED_SYNC = """
import os, sys
sys.path.insert(0, os.getcwd())
import distill
import sampler


def update_weights(self, named_tensors):
    # the tensors arrive (each bucket is a broadcast), and the engine keeps its weights
    for _ in named_tensors:
        pass


sampler.TorchSampler.update_weights = update_weights
sys.argv = ["distill.py"] + sys.argv[1:]
distill.main()
"""


def test_a_sampler_rank_that_misses_its_sync_stops_the_run(models, tmp_path):
    """The sampler rank's engine keeps its first weights: at step 1 the trainer checks step 2's
    rollouts, drawn with those, against the weights after one update (the ones the sampler should
    hold), and stops the run with one line; the sampler rank is told to stop."""
    script = tmp_path / "skipped_sync.py"
    script.write_text(SKIPPED_SYNC)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script)]
    p = run(cmd + distill_args((models["teacher"], models["student"]), tmp_path / "out",
                               method="opd", rollout_ranks=1, max_steps=4), ok=False)
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: step 1: stale sampler weights"), \
        p.stderr[-3000:]
    assert [r["step"] for r in log(tmp_path / "out")] == [0, 1]


@pytest.mark.parametrize("world,change,message", [
    (1, dict(rollout_ranks=1), "rollout_ranks=1 leaves no rank to train: the world has 1 rank"),
    (3, dict(rollout_ranks=3), "rollout_ranks=3 leaves no rank to train: the world has 3 rank"),
    (3, dict(rollout_ranks=-1), "rollout_ranks=-1: must be >= 0"),
    (3, dict(rollout_ranks=1, method="sft"), "rollout_ranks=1 with method=sft"),
    (3, dict(rollout_ranks=1, method="bridge_fit", bridge_path="b"),
     "rollout_ranks=1 with method=bridge_fit"),
    (4, dict(rollout_ranks=3, tensor_parallel_size=2),
     "tensor_parallel_size=2 does not divide the 3 sampler ranks"),
])
def test_bad_sampler_rank_settings_are_one_line(models, tmp_path, settings_restored, monkeypatch,
                                                capsys, world, change, message):
    """Refused before the process group starts or a folder is made."""
    from test_bad_input import main_in_process
    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = ["distill.py"] + distill_args((models["teacher"], models["student"]),
                                         tmp_path / "out", **change)
    code, _, err = main_in_process(settings_restored.main, argv, monkeypatch, capsys)
    assert code == 1 and len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_off_policy_steps_defaults_to_one_step_behind_with_sampler_ranks(settings_restored):
    """-1: one step behind with sampler ranks, on-policy without; what the user sets stays."""
    distill = settings_restored
    for ranks, method, asked, decided in [(1, "oprd", -1, 1), (0, "oprd", -1, 0),
                                          (1, "opd", 0, 0), (0, "sft", -1, 0)]:
        cfg = dict(rollout_ranks=ranks, method=method, off_policy_steps=asked)
        distill.resolve_defaults(cfg)
        assert cfg["off_policy_steps"] == decided


def test_weights_cross_in_buckets_both_sides_compute_alike():
    """Each bucket closes once it holds bucket_bytes or more, every tensor in exactly one, in
    order: bf16 tensors of 3, 5 and 4 MiB and a bias, against 8 MiB buckets."""
    from ranks import bucketed
    mib = 2**20
    shapes = [(3 * mib // 2,), (5 * mib // 2,), (1024, 2 * mib // 1024), (7,)]
    assert bucketed(shapes, 2, 8 * mib) == [[0, 1], [2, 3]]
    assert bucketed(shapes, 2, 1) == [[0], [1], [2], [3]]
    assert bucketed(shapes, 2, 64 * mib) == [[0, 1, 2, 3]]
