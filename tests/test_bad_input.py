"""Every bad setting or input a user can type stops with one line on stderr, a non-zero exit, no traceback, and
nothing written; every script answers --help. One parametrised case per class of mistake."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT, make_checkpoint

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mini_bench.jsonl")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bad_input") / "m", "qwen3")


def run(args, cwd=ROOT, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line(p, message):
    err = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(err) == 1 and message in err[0], p.stderr[-3000:]


DISTILL = [  # (overrides, the message's gist)
    (dict(prompts_per_step=0), "prompts_per_step=0: must be >= 1"),
    (dict(n_samples=0), "n_samples=0: must be >= 1"),
    (dict(micro_batch_size=0), "micro_batch_size=0: must be >= 1"),
    (dict(save_every=0), "save_every=0: must be >= 1"),
    (dict(log_every=0), "log_every=0: must be >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens=0: must be >= 1"),
    (dict(max_steps=0), "max_steps=0: must be >= 1"),
    (dict(k_positions=0), "k_positions=0: must be >= 1"),
    (dict(positions="last"), "positions='last': must be all, first_k or last_k"),
    (dict(distance="cos"), "distance='cos': must be mse or normalized_mse"),
    (dict(align="next"), "align='next': must be predict or token"),
    (dict(projector_init="zeros"), "projector_init='zeros': must be random or lstsq"),
    (dict(temperature=-1), "temperature=-1.0: must be >= 0"),
    (dict(top_p=0), "top_p=0.0: must be in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5: must be in (0, 1]"),
    (dict(lr=0), "lr=0.0: must be > 0"),
    (dict(warmup_frac=1.0), "warmup_frac=1.0: must be in [0, 1)"),
    (dict(backend="jax"), "backend='jax': must be auto, vllm or torch"),
    (dict(device="tpu"), "device='tpu': must be auto, cpu or cuda"),
    (dict(init_from="latest"), "init_from='latest': must be scratch or resume"),
    (dict(keep_checkpoints=0), "keep_checkpoints=0: must be >= 1"),
    (dict(tensor_parallel_size=3), "tensor_parallel_size=3 does not divide the 1 ranks"),
    (dict(teacher=""), "needs a teacher"),
    (dict(method="oprd_bridge"), "needs bridge_path"),
    (dict(init_from="resume"), "has no step_* checkpoint"),
    (dict(student="/no/such/model"), "/no/such/model"),
    (dict(prompts="tiny_nope"), "unknown benchmark 'tiny_nope'"),
    (dict(prompts="aime24", data_dir="/no/such/dir"), "data_dir '/no/such/dir' is not a folder"),
    (dict(layers="1,9"), "layers [9] out of range"),
]


@pytest.mark.parametrize("change,message", DISTILL, ids=[m for _, m in DISTILL])
def test_distill_refuses(ckpt, tmp_path, change, message):
    args = dict(student=ckpt, teacher=ckpt, out_dir=str(tmp_path / "out"), prompts=FIXTURE, backend="torch",
                device="cpu", max_new_tokens=8, max_steps=1)
    args.update(change)
    p = run(["distill.py"] + [f"--{k}={v}" for k, v in args.items()])
    assert_one_line(p, message)
    assert not os.path.exists(tmp_path / "out")


def test_distill_missing_file_in_data_dir(ckpt, tmp_path):
    p = run(["distill.py", f"--student={ckpt}", f"--teacher={ckpt}", f"--out_dir={tmp_path / 'out'}",
             "--prompts=aime24", f"--data_dir={tmp_path}", "--backend=torch", "--device=cpu"])
    assert_one_line(p, f"no aime24.jsonl in data_dir {str(tmp_path)!r}")


EVAL = [
    (["--n_samples=0"], "n_samples=0: must be >= 1"),
    (["--batch_problems=0"], "batch_problems=0: must be >= 1"),
    (["--max_new_tokens=0"], "max_new_tokens=0: must be >= 1"),
    (["--benchmarks="], "benchmarks='': must be at least one benchmark name"),
    (["--top_p=0"], "top_p=0.0: must be in (0, 1]"),
    (["--temperature=-0.5"], "temperature=-0.5: must be >= 0"),
    (["--device=gpu"], "device='gpu': must be auto, cpu or cuda"),
    (["--benchmarks={empty}"], "no problems in it"),
    (["--out={file}"], "is a file"),
    (["--ckpt={tmp}"], "no step_* checkpoint in it"),
]


@pytest.mark.parametrize("extra,message", EVAL, ids=[m for _, m in EVAL])
def test_eval_refuses(ckpt, tmp_path, extra, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "a_file").write_text("x")
    fill = dict(empty=tmp_path / "empty.jsonl", file=tmp_path / "a_file", tmp=tmp_path)
    args = [f"--ckpt={ckpt}", f"--benchmarks={FIXTURE}", "--backend=torch", "--device=cpu"]
    p = run(["eval.py"] + args + [a.format(**fill) for a in extra])
    assert_one_line(p, message)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "empty.jsonl"]


CONFIG_FILES = [
    ("x = 1/0\n", "ZeroDivisionError"),
    ("lr = (\n", "SyntaxError"),
    ("helper = 3\n", "a helper variable in a config file must start with '_'"),
]


@pytest.mark.parametrize("text,message", CONFIG_FILES, ids=[m for _, m in CONFIG_FILES])
def test_bad_config_file_is_one_line_and_exit_2(tmp_path, text, message):
    cfg = tmp_path / "c.py"
    cfg.write_text(text)
    p = run(["distill.py", str(cfg)])
    assert_one_line(p, message)
    assert p.returncode == 2


@pytest.mark.parametrize("script", ["distill.py", "eval.py", "tiny.py", "bench.py", "rollout.py"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_script_has_help(script, flag):
    p = run([script, flag])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "$ " in p.stdout or "usage" in p.stdout.lower()  # how to run it
    if script in ("distill.py", "eval.py"):
        assert "--max_new_tokens=" in p.stdout  # every key with its default
