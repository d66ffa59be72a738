"""eval.py end to end on a tiny checkpoint and a fixture benchmark: both backends, ranks, out_dir, errors; and the
evaluation sets shipped in benchmarks/, read offline by default."""

import json
import os
import shutil

import pytest
from conftest import ROOT

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mini_bench.jsonl")
SHIPPED = os.path.join(ROOT, "benchmarks")
SHARED_BENCH = os.path.join(os.path.dirname(ROOT), "shared", "bench")  # the copies the shipped ones came from


@pytest.fixture
def run_eval(settings_restored, monkeypatch, capsys):
    """run_eval(args, ok=True): eval.main() in this process, as `python eval.py args` runs it (no start-up cost);
    returns (exit status, stdout, stderr lines)."""
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
    for key in (f"avg@{n}", f"best@{n}", f"maj@{n}", "dist4g", "mean_len", "trunc_rate", "pass@1", f"pass@{n}"):
        assert key in s, key
    assert 0 <= s[f"avg@{n}"] <= s[f"best@{n}"] <= 1 and s["mean_len"] > 0
    with open(os.path.join(out, "samples.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == n_problems * n
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["finish"] in ("stop", "length") and isinstance(r["text"], str) and r["n_tokens"] > 0
        assert isinstance(r["correct"], bool) and (r["pred"] is None or isinstance(r["pred"], str))
    return s, rows


def n_fixture():
    with open(FIXTURE) as f:
        return sum(1 for line in f if line.strip())


@pytest.mark.parametrize("backend", ["torch", "vllm"])
def test_end_to_end_both_backends(tiny_qwen3, tmp_path, backend, run_eval):
    """Both in this process (the CPU engine runs in it too); test_run_guards runs eval.py with vLLM as a process."""
    out = tmp_path / "res"
    args = [f"--ckpt={tiny_qwen3}", f"--benchmarks={FIXTURE}", "--n_samples=3", "--max_new_tokens=12",
            f"--backend={backend}", f"--out={out}", "--temperature=1.0"]
    stdout = run_eval(args)[1]
    check_outputs(out, n_fixture(), 3)
    assert "avg@" in stdout.lower() or "Avg@" in stdout


def test_out_dir_of_distill_means_its_newest_checkpoint(tiny_qwen3, tmp_path, run_eval):
    run_dir = tmp_path / "run"
    for step in (100, 200):
        shutil.copytree(tiny_qwen3, run_dir / f"step_{step:07d}")
    shutil.copytree(tiny_qwen3, run_dir / "step_0000300.partial")  # an interrupted save is never picked
    _, out, _ = run_eval([f"--ckpt={run_dir}", f"--benchmarks={FIXTURE}", "--n_samples=1", "--max_new_tokens=4",
                          "--backend=torch", "--limit=2"])
    assert f"checkpoint: {run_dir / 'step_0000200'}" in out


def test_builtin_tiny_task_is_a_benchmark(tiny_qwen3, tmp_path, run_eval):
    out = tmp_path / "res"
    run_eval([f"--ckpt={tiny_qwen3}", "--benchmarks=tiny", "--limit=3", "--n_samples=1", "--max_new_tokens=4",
              "--backend=torch", f"--out={out}"])
    with open(out / "summary.json") as f:
        assert json.load(f)["tiny"]["n_problems"] == 3


@pytest.mark.parametrize("make_args,message", [
    (lambda t, tmp: [f"--ckpt={tmp}/none", f"--benchmarks={FIXTURE}"], "no config.json"),
    (lambda t, tmp: [f"--ckpt={t}", f"--benchmarks={tmp}/bad.jsonl"], "bad.jsonl, line 2: not valid JSON"),
    (lambda t, tmp: [f"--ckpt={t}", "--benchmarks=aime23"], "unknown benchmark 'aime23'"),
    (lambda t, tmp: [f"--ckpt={t}", "--n_sample=3"], "unknown config key 'n_sample'"),
    (lambda t, tmp: [f"--ckpt={t}", "--temperature=hot"], "config key 'temperature' expects float"),
])
def test_bad_input_is_one_error_line(tiny_qwen3, tmp_path, make_args, message, run_eval):
    with open(tmp_path / "bad.jsonl", "w") as f:
        f.write('{"problem": "1+1", "answer": "2"}\n{"problem": "broken"\n')
    code, _, err = run_eval(make_args(tiny_qwen3, tmp_path) + ["--backend=torch"], ok=False)
    assert code != 0 and len(err) == 1 and message in err[0], err[-40:]


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("name, n_rows, first_id", [("aime24", 30, "2024-I-1"), ("aime25", 30, "2025-I-1"),
                                                    ("aimo", 83, "2022-12A-1")])
def test_shipped_benchmarks_load_offline_without_data_dir(name, n_rows, first_id, monkeypatch):
    import data
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPRD_DATA_DIR", raising=False)
    rows = read_rows(os.path.join(SHIPPED, f"{name}.jsonl"))
    problems = data.load_problems(name)
    assert len(problems) == n_rows == len({p["id"] for p in problems}) and problems[0]["id"] == first_id
    assert [(p["id"], p["problem"], p["answer"]) for p in problems] == \
        [(r["id"], r["problem"], r["answer"]) for r in rows]
    assert all(str(int(p["answer"])) == p["answer"] for p in problems)  # integers, no zero padding
    if os.path.isdir(SHARED_BENCH):  # optional: where the copies came from, when it sits beside the repository
        assert rows == read_rows(os.path.join(SHARED_BENCH, f"{name}.jsonl"))


def test_eval_reads_a_shipped_benchmark_by_name_offline(tiny_qwen3, tmp_path, run_eval):
    out = tmp_path / "res"
    run_eval([f"--ckpt={tiny_qwen3}", "--benchmarks=aime24", "--limit=2", "--n_samples=1", "--max_new_tokens=4",
              "--backend=torch", f"--out={out}"])
    with open(out / "summary.json") as f:
        assert json.load(f)["aime24"]["n_problems"] == 2
    gold = read_rows(os.path.join(SHIPPED, "aime24.jsonl"))[:2]
    assert [(r["problem_id"], r["gold"]) for r in read_rows(out / "samples.jsonl")] == \
        [(g["id"], g["answer"]) for g in gold]
