"""Every file in config/ applies cleanly to distill.py's settings: known keys, right types, valid choices."""

import glob
import os

import pytest
from conftest import ROOT


def distill_defaults():
    import distill
    return {k: v for k, v in vars(distill).items() if not k.startswith('_') and k.islower()
            and isinstance(v, (int, float, bool, str, list, tuple, type(None)))}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))))
def test_config_file_applies(path, monkeypatch):
    import distill
    from configurator import apply_config
    monkeypatch.chdir(ROOT)  # config files chain with exec(open('config/...')) from the repository root
    cfg = apply_config([os.path.relpath(path, ROOT)], distill_defaults(), verbose=False)
    assert cfg["method"] in distill.METHODS
    assert cfg["out_dir"] and (cfg["student"] or cfg["method"] == "sft")  # tiny.py gives sft its student


def test_paper_configs_match_method_md():
    """config/qwen.py is the paper's main setting (METHOD.md §5); its siblings change only the method."""
    from configurator import apply_config
    main = apply_config([os.path.join(ROOT, "config", "qwen.py")], distill_defaults(), verbose=False)
    assert (main["prompts_per_step"], main["n_samples"], main["max_new_tokens"], main["max_steps"]) == (8, 2, 16384, 500)
    assert (main["lr"], main["warmup_frac"], main["grad_clip"], main["weight_decay"]) == (1e-5, 0.03, 1.0, 0.01)
    assert (main["layers"], main["positions"], main["k_positions"], main["distance"]) == ("all", "last_k", 2000, "mse")
    assert main["student"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" and main["teacher"] == "hbx/JustRL-DeepSeek-1.5B"
    for name, method in (("qwen_opd", "opd"), ("qwen_opd_topk", "opd_topk"), ("qwen_opd_full", "opd_full")):
        cur = os.getcwd()
        os.chdir(ROOT)
        try:
            cfg = apply_config([f"config/{name}.py"], distill_defaults(), verbose=False)
        finally:
            os.chdir(cur)
        assert cfg["method"] == method
        assert {k: v for k, v in cfg.items() if k not in ("method", "out_dir")} == \
            {k: v for k, v in main.items() if k not in ("method", "out_dir")}
