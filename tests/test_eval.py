"""eval.py end to end on a tiny checkpoint and a fixture benchmark: both backends, ranks, out_dir,
errors; and the evaluation sets shipped in benchmarks/, read offline by default."""

import datetime
import json
import os
import shutil

import pytest
from conftest import ROOT

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mini_bench.jsonl")
SHIPPED = os.path.join(ROOT, "benchmarks")
# the copies the shipped ones came from
SHARED_BENCH = os.path.join(os.path.dirname(ROOT), "shared", "bench")


@pytest.fixture
def run_eval(settings_restored, monkeypatch, capsys):
    """run_eval(args, ok=True): eval.main() in this process, as `python eval.py args` runs it (no
    start-up cost); returns (exit status, stdout, stderr lines)."""
    import eval as ev
    from test_bad_input import main_in_process
    monkeypatch.delenv("OPRD_DATA_DIR", raising=False)  # the lookup a user gets by default

    def run(args, ok=True):
        code, out, err = main_in_process(ev.main, ["eval.py"] + args, monkeypatch, capsys)
        if ok and code:
            raise AssertionError(f"exit {code}\n{out[-3000:]}\n" + "\n".join(err[-40:]))
        return code, out, err
    return run


def check_outputs(out, n_problems, n):
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    s = summary["mini_bench"] if "mini_bench" in summary else next(iter(summary.values()))
    keys = (f"avg@{n}", f"best@{n}", f"maj@{n}", "dist4g", "mean_len", "trunc_rate", "pass@1",
            f"pass@{n}")
    for key in keys:
        assert key in s, key
    assert 0 <= s[f"avg@{n}"] <= s[f"best@{n}"] <= 1 and s["mean_len"] > 0
    with open(os.path.join(out, "samples.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == n_problems * n
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["finish"] in ("stop", "length") and isinstance(r["text"], str)
        assert r["n_tokens"] > 0
        assert isinstance(r["correct"], bool) and (r["pred"] is None or isinstance(r["pred"], str))
    return s, rows


def n_fixture():
    with open(FIXTURE) as f:
        return sum(1 for line in f if line.strip())


@pytest.mark.parametrize("backend", ["torch", "vllm"])
def test_end_to_end_both_backends(tiny_qwen3, tmp_path, backend, run_eval):
    """Both in this process (the CPU engine runs in it too); test_run_guards runs eval.py with vLLM
    as a process."""
    out = tmp_path / "res"
    args = [f"--ckpt={tiny_qwen3}", f"--benchmarks={FIXTURE}", "--n_samples=3",
            "--max_new_tokens=12", f"--backend={backend}", f"--out={out}", "--temperature=1.0"]
    stdout = run_eval(args)[1]
    check_outputs(out, n_fixture(), 3)
    assert "avg@" in stdout.lower() or "Avg@" in stdout


def test_out_dir_of_distill_means_its_newest_checkpoint(tiny_qwen3, tmp_path, run_eval):
    run_dir = tmp_path / "run"
    for step in (100, 200):
        shutil.copytree(tiny_qwen3, run_dir / f"step_{step:07d}")
    # an interrupted save is never picked
    shutil.copytree(tiny_qwen3, run_dir / "step_0000300.partial")
    _, out, _ = run_eval([f"--ckpt={run_dir}", f"--benchmarks={FIXTURE}", "--n_samples=1",
                          "--max_new_tokens=4", "--backend=torch", "--limit=2"])
    assert f"checkpoint: {run_dir / 'step_0000200'}" in out


def test_builtin_tiny_task_is_a_benchmark(tiny_qwen3, tmp_path, run_eval):
    out = tmp_path / "res"
    run_eval([f"--ckpt={tiny_qwen3}", "--benchmarks=tiny", "--limit=3", "--n_samples=1",
              "--max_new_tokens=4", "--backend=torch", f"--out={out}"])
    with open(out / "summary.json") as f:
        assert json.load(f)["tiny"]["n_problems"] == 3


@pytest.mark.parametrize("make_args,message", [
    (lambda t, tmp: [f"--ckpt={tmp}/none", f"--benchmarks={FIXTURE}"], "no config.json"),
    (lambda t, tmp: [f"--ckpt={t}", f"--benchmarks={tmp}/bad.jsonl"],
     "bad.jsonl, line 2: not valid JSON"),
    (lambda t, tmp: [f"--ckpt={t}", "--benchmarks=aime23"], "unknown benchmark 'aime23'"),
    (lambda t, tmp: [f"--ckpt={t}", "--n_sample=3"], "unknown config key 'n_sample'"),
    (lambda t, tmp: [f"--ckpt={t}", "--temperature=hot"], "config key 'temperature' expects float"),
])
def test_bad_input_is_one_error_line(tiny_qwen3, tmp_path, make_args, message, run_eval):
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.write('{"problem": "1+1", "answer": "2"}\n{"problem": "broken"\n')
    code, _, err = run_eval(make_args(tiny_qwen3, tmp_path) + ["--backend=torch"], ok=False)
    assert code != 0 and len(err) == 1 and message in err[0], err[-40:]


class GroupStarted(Exception):
    """Raised by the stand-in init_process_group: a test ends there, before any model loads."""


@pytest.mark.parametrize("device, extra, backend_name, minutes", [
    ("cuda", [], "nccl", 120),
    ("auto", ["--dist_timeout_min=45"], "nccl", 45),
    ("cpu", [], "gloo", 120),
])
def test_a_rank_starts_the_group_on_its_own_device(device, extra, backend_name, minutes,
                                                   settings_restored, monkeypatch, capsys):
    """Rank 1 of 2 under torchrun on a node with GPUs: with device cuda (or auto) it binds
    cuda:LOCAL_RANK before the NCCL group starts (else every rank gathers on cuda:0 and NCCL stops
    with "Duplicate GPU detected"); with device cpu it starts gloo and binds no GPU. Either way the
    group waits dist_timeout_min. No GPU needed: torch.cuda and the group's start are stand-ins that
    record their arguments, and the run ends where the group would start."""
    import torch
    import torch.distributed as dist
    import eval as ev
    from test_bad_input import main_in_process
    calls = []

    def init_process_group(backend, **kwargs):
        calls.append(("init_process_group", backend, kwargs))
        raise GroupStarted

    def set_device(d):
        calls.append(("set_device", torch.device(d)))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    for key, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    argv = ["eval.py", f"--device={device}", "--backend=torch"] + extra
    with pytest.raises(GroupStarted):
        main_in_process(ev.main, argv, monkeypatch, capsys)
    gpu = torch.device("cuda", 1)
    bound = [("set_device", gpu)] if backend_name == "nccl" else []
    # the device is bound first, then the group starts, once
    assert calls[:-1] == bound, calls
    name, backend, kwargs = calls[-1]
    assert (name, backend) == ("init_process_group", backend_name)
    assert kwargs["timeout"] == datetime.timedelta(minutes=minutes)
    if backend_name == "nccl":
        assert torch.device(kwargs["device_id"]) == gpu
    else:
        assert "device_id" not in kwargs


@pytest.mark.parametrize("value", ["0", "-5"])
def test_bad_dist_timeout_stops_before_any_work(value, tiny_qwen3, tmp_path, run_eval, monkeypatch):
    """Checked with the other settings: one error line and exit 1 before the process group starts
    (here under a simulated torchrun of 2 ranks), a model loads or --out is made."""
    import torch.distributed as dist

    def init_process_group(*args, **kwargs):
        raise AssertionError("the process group started")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "res"
    args = [f"--ckpt={tiny_qwen3}", f"--benchmarks={FIXTURE}", "--backend=torch", "--device=cpu",
            f"--dist_timeout_min={value}", f"--out={out}"]
    code, stdout, err = run_eval(args, ok=False)
    assert code == 1 and len(err) == 1, err[-40:]
    assert f"dist_timeout_min={value}: must be > 0" in err[0], err
    assert "evaluating" not in stdout and not out.exists()


def test_bad_dist_timeout_as_a_process():
    from test_bad_input import assert_one_line, run
    p = run(["eval.py", "--dist_timeout_min=0"])
    assert_one_line(p, "dist_timeout_min=0: must be > 0")
    assert p.returncode == 1


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name, n_rows, first_id", [("aime24", 30, "2024-I-1"),
                                                    ("aime25", 30, "2025-I-1"),
                                                    ("aimo", 83, "2022-12A-1")])
def test_shipped_benchmarks_load_offline_without_data_dir(name, n_rows, first_id, monkeypatch):
    import data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPRD_DATA_DIR", raising=False)
    rows = read_rows(os.path.join(SHIPPED, f"{name}.jsonl"))
    problems = data.load_problems(name)
    assert len(problems) == n_rows == len({p["id"] for p in problems})
    assert problems[0]["id"] == first_id
    assert ([(p["id"], p["problem"], p["answer"]) for p in problems]
            == [(r["id"], r["problem"], r["answer"]) for r in rows])
    assert all(str(int(p["answer"])) == p["answer"] for p in problems)  # integers, no zero padding
    # optional: where the copies came from, when it sits beside the repository
    if os.path.isdir(SHARED_BENCH):
        assert rows == read_rows(os.path.join(SHARED_BENCH, f"{name}.jsonl"))


def test_eval_reads_a_shipped_benchmark_by_name_offline(tiny_qwen3, tmp_path, run_eval):
    out = tmp_path / "res"
    run_eval([f"--ckpt={tiny_qwen3}", "--benchmarks=aime24", "--limit=2", "--n_samples=1",
              "--max_new_tokens=4", "--backend=torch", f"--out={out}"])
    with open(out / "summary.json") as f:
        assert json.load(f)["aime24"]["n_problems"] == 2
    gold = read_rows(os.path.join(SHIPPED, "aime24.jsonl"))[:2]
    assert ([(r["problem_id"], r["gold"]) for r in read_rows(out / "samples.jsonl")]
            == [(g["id"], g["answer"]) for g in gold])
