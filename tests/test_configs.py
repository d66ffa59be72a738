"""Every file in config/ applies cleanly to distill.py's settings: known keys, right types, valid
choices. distill.py's max_num_seqs reaches a vLLM engine's arguments (no engine started) and is
checked in one line."""

import glob
import os
import sys

import pytest
import torch
from conftest import ROOT

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mini_bench.jsonl")


def distill_defaults():
    import distill
    return {k: v for k, v in vars(distill).items() if not k.startswith('_') and k.islower()
            and isinstance(v, (int, float, bool, str, list, tuple, type(None)))}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))))
def test_config_file_applies(path, monkeypatch):
    import checks
    from configurator import apply_config
    # config files chain with exec(open('config/...')) from the repository root
    monkeypatch.chdir(ROOT)
    cfg = apply_config([os.path.relpath(path, ROOT)], distill_defaults(), verbose=False)
    assert cfg["method"] in checks.METHODS
    # tiny.py gives sft its student
    assert cfg["out_dir"] and (cfg["student"] or cfg["method"] == "sft")


def test_paper_configs_match_method_md():
    """config/qwen.py is the paper's main setting (METHOD.md §5); its siblings change only the
    method."""
    from configurator import apply_config
    main = apply_config([os.path.join(ROOT, "config", "qwen.py")], distill_defaults(),
                        verbose=False)
    assert (main["prompts_per_step"], main["n_samples"], main["max_new_tokens"],
            main["max_steps"]) == (8, 2, 16384, 500)
    assert (main["lr"], main["warmup_frac"], main["grad_clip"],
            main["weight_decay"]) == (1e-5, 0.03, 1.0, 0.01)
    assert (main["layers"], main["positions"], main["k_positions"],
            main["distance"]) == ("all", "last_k", 2000, "mse")
    assert main["student"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert main["teacher"] == "hbx/JustRL-DeepSeek-1.5B"
    # one GPU (config/qwen_1gpu.py) sends all 16 of a step's rollouts to one engine: all at once
    assert main["prompts_per_step"] * main["n_samples"] <= main["max_num_seqs"] == 64
    for name, method in (("qwen_opd", "opd"), ("qwen_opd_topk", "opd_topk"),
                         ("qwen_opd_full", "opd_full")):
        cur = os.getcwd()
        os.chdir(ROOT)
        try:
            cfg = apply_config([f"config/{name}.py"], distill_defaults(), verbose=False)
        finally:
            os.chdir(cur)
        assert cfg["method"] == method
        assert {k: v for k, v in cfg.items() if k not in ("method", "out_dir")} == \
            {k: v for k, v in main.items() if k not in ("method", "out_dir")}


class Recorder:
    """Stands in for a sampler class: keeps the arguments it was built with, starts nothing."""
    made = []

    def __init__(self, *args, **kwargs):
        Recorder.made.append(kwargs)


@pytest.mark.parametrize("backend", ["vllm", "torch"])
def test_max_num_seqs_reaches_only_the_vllm_engine(backend, pair, monkeypatch):
    """startup.start hands max_num_seqs to make_sampler; the vLLM backend passes it on to vLLM's
    LLM(...) arguments (engine_args), the torch backend leaves it out (rollout.VLLM_ONLY)."""
    import rollout
    import startup
    import vllm_sampler
    from tokenizer import read_json
    teacher, student = pair
    cfg = dict(distill_defaults(), student=student, teacher=teacher, backend=backend,
               prompts=FIXTURE, max_prompt_len=256, max_new_tokens=8, max_num_seqs=5,
               off_policy_steps=0)
    monkeypatch.setattr(startup, "started_samplers", [])
    monkeypatch.setattr(Recorder, "made", [])
    monkeypatch.setattr(rollout, "VLLMSampler", Recorder)
    monkeypatch.setattr(rollout, "TorchSampler", Recorder)
    from ranks import Roles
    # one process that trains and samples
    alone = Roles(0, 1, 0, None, [], None)
    sampler = startup.start(cfg, torch.device("cpu"), None, None, alone).sampler
    assert isinstance(sampler, Recorder) and len(Recorder.made) == 1
    kwargs = Recorder.made[0]
    if backend == "torch":
        assert "max_num_seqs" not in kwargs
        return
    assert kwargs["max_num_seqs"] == 5
    # what VLLMSampler.__init__ does with them before LLM(**args)
    engine_kw = {k: v for k, v in kwargs.items()
                 if k not in ("device", "bucket_mb", "dp_rank", "own_world")}
    hf_config = read_json(os.path.join(student, "config.json"))
    args = vllm_sampler.engine_args(student, hf_config, "cuda", 1, **engine_kw)
    assert args["max_num_seqs"] == 5


@pytest.mark.parametrize("value, code, message", [
    ("0", 1, "max_num_seqs=0: must be >= 1"),
    ("-4", 1, "max_num_seqs=-4: must be >= 1"),
    ("2.5", 2, "config key 'max_num_seqs' expects int"),
    ("many", 2, "config key 'max_num_seqs' expects int"),
])
def test_a_bad_max_num_seqs_is_one_line(value, code, message, settings_restored, monkeypatch,
                                        capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["distill.py", f"--max_num_seqs={value}",
                                      f"--out_dir={tmp_path / 'out'}"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        settings_restored.main()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stopped.value.code == code
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(tmp_path / "out")
