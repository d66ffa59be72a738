"""Every bad setting or input a user can type stops with one line on stderr, a non-zero exit, no
traceback, and nothing written; every script answers --help. One parametrised case per class of
mistake, run through the script's main() in this process (as the command line would run it); a few
run as real processes, to show the exit status and the lone stderr line from the outside."""

import json
import os
import runpy
import subprocess
import sys

import pytest
from conftest import ROOT, make_checkpoint

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mini_bench.jsonl")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A checkpoint; a wider one; one with the same strings under other token ids (an output-space
    loss cannot compare next-token distributions over two vocabularies: refused)."""
    root = tmp_path_factory.mktemp("bad_input")
    other = make_checkpoint(root / "other_tok", "qwen3", seed=6)
    vocab = json.load(open(os.path.join(other, "tokenizer.json")))
    ids = vocab["model"]["vocab"]
    vocab["model"]["vocab"] = {k: (v + 1) % len(ids) for k, v in ids.items()}
    with open(os.path.join(other, "tokenizer.json"), "w") as f:
        json.dump(vocab, f)
    return {"m": make_checkpoint(root / "m", "qwen3"), "other_tok": other,
            "wide": make_checkpoint(root / "wide", "qwen3", hidden_size=96, num_attention_heads=3,
                                    seed=5)}


def run(args, cwd=ROOT, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line(p, message):
    err = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(err) == 1 and message in err[0], p.stderr[-3000:]


def main_in_process(main, argv, monkeypatch, capsys):
    """Run a script's main() as `python argv...` would; returns
    (exit status, stdout, stderr lines)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", argv)
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


# (overrides, the message's gist, exit status: 2 for the configurator's, 1 for the rest)
DISTILL = [
    (dict(prompts_per_step=0), "prompts_per_step=0: must be >= 1", 1),
    (dict(n_samples=0), "n_samples=0: must be >= 1", 1),
    (dict(micro_batch_size=0), "micro_batch_size=0: must be >= 1", 1),
    (dict(save_every=0), "save_every=0: must be >= 1", 1),
    (dict(log_every=0), "log_every=0: must be >= 1", 1),
    (dict(max_new_tokens=0), "max_new_tokens=0: must be >= 1", 1),
    (dict(max_steps=0), "max_steps=0: must be >= 1", 1),
    (dict(k_positions=0), "k_positions=0: must be >= 1", 1),
    (dict(positions="last"), "positions='last': must be all, first_k or last_k", 1),
    (dict(distance="cos"), "distance='cos': must be mse or normalized_mse", 1),
    (dict(align="next"), "align='next': must be predict or token", 1),
    (dict(projector_init="zeros"), "projector_init='zeros': must be random or lstsq", 1),
    (dict(temperature=-1), "temperature=-1.0: must be >= 0", 1),
    (dict(top_p=0), "top_p=0.0: must be in (0, 1]", 1),
    (dict(top_p=1.5), "top_p=1.5: must be in (0, 1]", 1),
    (dict(lr=0), "lr=0.0: must be > 0", 1),
    (dict(warmup_frac=1.0), "warmup_frac=1.0: must be in [0, 1)", 1),
    (dict(max_unaligned_share=1.0), "max_unaligned_share=1.0: must be in [0, 1)", 1),
    (dict(backend="jax"), "backend='jax': must be auto, vllm or torch", 1),
    (dict(device="tpu"), "device='tpu': must be auto, cpu or cuda", 1),
    (dict(init_from="latest"), "init_from='latest': must be scratch or resume", 1),
    (dict(keep_checkpoints=0), "keep_checkpoints=0: must be >= 1", 1),
    (dict(tensor_parallel_size=3), "tensor_parallel_size=3 does not divide the 1 ranks", 1),
    (dict(method="opd_reverse"), "method='opd_reverse' does not exist", 1),
    (dict(teacher=""), "needs a teacher", 1),
    (dict(method="oprd_bridge"), "needs bridge_path", 1),
    (dict(init_from="resume"), "has no step_* checkpoint", 1),
    (dict(student="/no/such/model"), "/no/such/model", 1),
    (dict(prompts="tiny_nope"), "unknown benchmark 'tiny_nope'", 1),
    (dict(prompts="nope.jsonl"), "no such file: nope.jsonl", 1),
    (dict(prompts="aime24", data_dir="/no/such/dir"),
     "data_dir '/no/such/dir' is not a folder", 1),
    (dict(layers="1,9"), "layers [9] out of range", 1),
    (dict(teacher="{wide}"), "teacher width 96 != student width 64: set projector=True", 1),
    (dict(teacher="{other_tok}", method="opd"),
     "tokenizes differently from the student: across tokenizers use", 1),
    (dict(lr="fast"), "config key 'lr' expects float", 2),
    (dict(lerning_rate=1.0), "unknown config key 'lerning_rate'", 2),
]


def distill_args(ckpts, out, change):
    args = dict(student=ckpts["m"], teacher=ckpts["m"], out_dir=str(out), prompts=FIXTURE,
                backend="torch", device="cpu", max_new_tokens=8, max_steps=1)
    args.update({k: v.format(**ckpts) if isinstance(v, str) else v for k, v in change.items()})
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.mark.parametrize("change,message,code", DISTILL, ids=[m for _, m, _ in DISTILL])
def test_distill_refuses(ckpts, tmp_path, settings_restored, monkeypatch, capsys, change, message,
                         code):
    argv = ["distill.py"] + distill_args(ckpts, tmp_path / "out", change)
    got, _, err = main_in_process(settings_restored.main, argv, monkeypatch, capsys)
    assert got == code and len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_distill_refuses_as_a_process(ckpts, tmp_path):
    """From the outside: exit status 1, one stderr line, no traceback, for a mistake found after the
    process group is up and the models load."""
    p = run(["distill.py"] + distill_args(ckpts, tmp_path / "out", dict(student="/no/such/model")))
    assert_one_line(p, "/no/such/model")
    assert p.returncode == 1 and not os.path.exists(tmp_path / "out")


def test_distill_missing_file_in_data_dir(ckpts, tmp_path, settings_restored, monkeypatch, capsys):
    argv = ["distill.py", f"--student={ckpts['m']}", f"--teacher={ckpts['m']}",
            f"--out_dir={tmp_path / 'out'}", "--prompts=aime24", f"--data_dir={tmp_path}",
            "--backend=torch", "--device=cpu"]
    code, _, err = main_in_process(settings_restored.main, argv, monkeypatch, capsys)
    message = f"no aime24.jsonl in data_dir {str(tmp_path)!r}"
    assert code == 1 and len(err) == 1 and message in err[0], err


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


def eval_argv(ckpts, tmp_path, extra):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "a_file").write_text("x")
    fill = dict(empty=tmp_path / "empty.jsonl", file=tmp_path / "a_file", tmp=tmp_path)
    return ([f"--ckpt={ckpts['m']}", f"--benchmarks={FIXTURE}", "--backend=torch", "--device=cpu"]
            + [a.format(**fill) for a in extra])


@pytest.mark.parametrize("extra,message", EVAL, ids=[m for _, m in EVAL])
def test_eval_refuses(ckpts, tmp_path, settings_restored, monkeypatch, capsys, extra, message):
    import eval as ev
    argv = ["eval.py"] + eval_argv(ckpts, tmp_path, extra)
    code, _, err = main_in_process(ev.main, argv, monkeypatch, capsys)
    assert code == 1 and len(err) == 1 and message in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["a_file", "empty.jsonl"]


def test_eval_refuses_as_a_process(ckpts, tmp_path):
    p = run(["eval.py"] + eval_argv(ckpts, tmp_path, ["--ckpt={tmp}"]))
    assert_one_line(p, "no step_* checkpoint in it")
    assert p.returncode == 1 and sorted(os.listdir(tmp_path)) == ["a_file", "empty.jsonl"]


CONFIG_FILES = [
    ("x = 1/0\n", "ZeroDivisionError"),
    ("lr = (\n", "SyntaxError"),
    ("helper = 3\n", "a helper variable in a config file must start with '_'"),
]


@pytest.mark.parametrize("text,message", CONFIG_FILES, ids=[m for _, m in CONFIG_FILES])
def test_bad_config_file_is_one_line_and_exit_2(tmp_path, settings_restored, monkeypatch, capsys,
                                                text, message):
    cfg = tmp_path / "c.py"
    cfg.write_text(text)
    code, _, err = main_in_process(settings_restored.main, ["distill.py", str(cfg)], monkeypatch,
                                   capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_bad_config_file_as_a_process(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text(CONFIG_FILES[0][0])
    p = run(["distill.py", str(cfg)])
    assert_one_line(p, CONFIG_FILES[0][1])
    assert p.returncode == 2


def script_main(script):
    """The script run as __main__ (its own fresh globals; the imported module is untouched)."""
    return lambda: runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


@pytest.mark.parametrize("script", ["distill.py", "eval.py", "tiny.py", "rollout.py"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_script_has_help(script, flag, monkeypatch, capsys):
    code, out, _ = main_in_process(script_main(script), [script, flag], monkeypatch, capsys)
    assert code in (0, None)
    # how to run it
    assert "$ " in out or "usage" in out.lower()
    if script in ("distill.py", "eval.py"):
        # every key with its default
        assert "--max_new_tokens=" in out


# the lab's tools, run from the root as modules: a key each one's --help must list, and a setting
# under which any work started would leave a trace
LAB_MODULES = {"lab.study": ("--jobs=", "--work_dir={tmp}"),
               "lab.bench": ("--sections=", "--json={tmp}/bench.json")}


@pytest.mark.parametrize("module", sorted(LAB_MODULES))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_lab_module_has_help(module, flag, tmp_path):
    """`python -m lab.NAME --help` from the root: exit 0, how to run it and every setting with its
    default, and no work started (the help flag wins over the settings before it, and nothing
    appears where the work would write)."""
    key, setting = LAB_MODULES[module]
    work = tmp_path / "work"
    p = run(["-m", module, setting.format(tmp=work), flag], timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"$ python -m {module}" in p.stdout
    assert "settings (config files and --key=value override them" in p.stdout
    assert key in p.stdout
    assert not work.exists()


def test_in_process_main_starts_from_the_defaults(settings_restored, monkeypatch, capsys, tmp_path):
    """The settings_restored fixture: a main() run here sees the defaults, not the
    previous run's settings."""
    distill = settings_restored
    default_lr = settings_restored.lr
    code, _, _ = main_in_process(distill.main, ["distill.py", "--lr=0.5", "--method=nope"],
                                 monkeypatch, capsys)
    # configure() set the module's globals
    assert code == 1 and distill.lr == 0.5 and distill.method == "nope"
    code, _, err = main_in_process(distill.main, ["distill.py", "--method=nope2"], monkeypatch,
                                   capsys)
    assert code == 1 and "nope2" in err[0] and distill.lr == default_lr
