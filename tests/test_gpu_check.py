"""lab/gpu_check.py, the first-run check of a GPU node, run with its CPU parts: the torch sampler's
weight sync, a 2-step distill.py run and an eval.py run (vLLM's CPU engine would add about 45 s on
a 2-core machine, so it is left out). Then what a failing check prints, and bad settings."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from configurator import settings
from lab import gpu_check
from sampler import TorchSampler


@pytest.fixture
def fresh_settings(monkeypatch):
    """main() in this process rewrites the script's settings: they are put back after the test."""
    for key, value in settings(vars(gpu_check)).items():
        monkeypatch.setattr(gpu_check, key, value)


def run_main(argv, capsys):
    """gpu_check.main(argv) in this process: its exit status and what it printed."""
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(argv)
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def test_cpu_parts_pass():
    cmd = [sys.executable, "-m", "lab.gpu_check", "--device=cpu", "--backends=torch"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = p.stdout.splitlines()
    for name in ("tiny_model", "weight_sync/torch", "distill/torch/1rank", "eval/torch/1rank"):
        assert any(line.startswith(f"ok   {name}  ") for line in lines), p.stdout
    assert "skip graph_vs_eager/torch  (CUDA graphs need a GPU)" in lines
    assert not any(line.startswith("FAILED") for line in lines)
    assert lines[-1].startswith("all checks passed in ")
    # the temporary work_dir is removed after a pass
    header = next(line for line in lines if line.startswith("gpu_check on CPU"))
    work_dir = header.rsplit("work_dir ", 1)[1]
    assert not os.path.exists(work_dir)


def test_a_sync_that_never_arrives_fails(tmp_path, monkeypatch, capsys, fresh_settings):
    """A sampler whose update_weights does nothing: the weight_sync check fails at once, with its
    one FAILED line, and exit status 1."""
    monkeypatch.setattr(TorchSampler, "update_weights", lambda self, named_tensors: None)
    argv = ["--device=cpu", "--backends=torch", f"--work_dir={tmp_path}"]
    code, out, _ = run_main(argv, capsys)
    assert code == 1
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and out.rstrip().endswith(failed[0])
    assert failed[0].startswith("FAILED weight_sync/torch: the sampler's log-probs differ")
    assert failed[0].endswith("the new weights did not reach the engine")


def test_a_failing_run_names_its_error_and_log(tmp_path, monkeypatch, capsys, fresh_settings):
    """distill.py refusing a setting: the FAILED line carries its error line and its log's path."""
    launch = gpu_check.launch

    def with_a_typo(script, args, ranks, log_path):
        return launch(script, dict(args, method="oprdd"), ranks, log_path)

    monkeypatch.setattr(gpu_check, "launch", with_a_typo)
    argv = ["--device=cpu", "--backends=torch", f"--work_dir={tmp_path}"]
    code, out, _ = run_main(argv, capsys)
    assert code == 1
    assert "ok   weight_sync/torch  " in out
    failed = out.rstrip().splitlines()[-1]
    log_path = os.path.join(tmp_path, "torch_1rank.log")
    assert failed.startswith("FAILED distill/torch/1rank: distill.py exited 1: error: ")
    assert "oprdd" in failed and failed.endswith(f"(its whole output: {log_path})")
    assert os.path.isfile(log_path)


def test_help_and_bad_settings(capsys, fresh_settings):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0 and "--backends='torch,vllm'" in out and "--logp_tol=0.1" in out
    code, _, err = run_main(["--backends=torch,tpu"], capsys)
    assert code == 2 and err.strip() == "error: unknown backend 'tpu': expected torch or vllm"


def test_the_sampler_rank_check_on_a_cpu(tmp_path):
    """The check a node of 2 or more GPUs runs for config/qwen_async.py's set-up, here on gloo:
    distill.py with 1 trainer rank + 1 sampler rank, 2 steps one step behind."""
    import torch
    student, teacher = str(tmp_path / "student"), str(tmp_path / "teacher")
    gpu_check.check_tiny_model(torch.device("cpu"), student, teacher)
    detail, memory = gpu_check.check_distill(torch.device("cpu"), "torch", student, teacher, 2,
                                             str(tmp_path / "split"), rollout_ranks=1)
    assert detail.startswith("2 steps, loss ") and "the sampler ranks drew for " in detail
    assert memory == []
    with open(tmp_path / "split.log") as f:
        assert "world 2 (1 train, 1 sample)" in f.read()
