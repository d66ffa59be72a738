"""A checkpoint saved by model.py is served by vLLM (CPU build) unchanged: the same greedy tokens as
transformers, after the engine's start-up weight sync; and in-place updates reach a tied LM head
(the tiny task's models, Qwen2.5-small, Qwen3 <= 4B). One engine for the module, on a tied Qwen3
saved by model.py, closed at teardown."""

import pytest
import torch
from conftest import make_checkpoint
from model import Transformer
from rollout import fsdp_named_tensors, make_sampler
from vllm_sampler import checkpoint_tensors, vllm_device_type
from test_rollout import assert_same_greedy

PROMPTS = [[5, 17, 42, 99, 3], [7, 8, 9, 200, 201, 202, 11]]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tied checkpoint, changed by model.py (so the weights are ours, not the source's) and saved
    by it."""
    source = make_checkpoint(tmp_path_factory.mktemp("tied"), "qwen3", tied=True, seed=7)
    model = Transformer.from_pretrained(source)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    out = str(tmp_path_factory.mktemp("saved") / "saved")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine(saved):
    runs_on = vllm_device_type()
    # None: vLLM does not import, and the tests fail saying so
    if runs_on not in ("cpu", None):
        pytest.skip(f"these tests pin vLLM's CPU build; this vLLM runs on {runs_on}")
    sampler = make_sampler("vllm", saved, device="cpu", dtype="float32", max_model_len=256,
                           enforce_eager=True)
    yield sampler
    # now, not at exit, when vLLM's shutdown would log to closed streams after pytest's
    # summary
    sampler.close()


def greedy(sampler):
    samples = sampler.generate(PROMPTS, temperature=0, max_new_tokens=12, stop_ids=[])
    return [r[0].tokens for r in samples]


def test_saved_checkpoint_loads_in_vllm(saved, engine):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    want = []
    for p in PROMPTS:
        g = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
        want.append(g[0, len(p):].tolist())
    assert greedy(engine) == want
    # alone on the CPU the engine core runs in this process (test_rollout_vllm: a child)
    assert engine.in_process


def test_update_weights_tied_model(tmp_path, saved, engine):
    """The update reaches the LM head too, which vLLM keeps as a layer of its own."""
    source = make_checkpoint(tmp_path / "b", "qwen3", tied=True, seed=8)
    b = Transformer.from_pretrained(source).eval()
    try:
        engine.update_weights(fsdp_named_tensors(b))
        ours, ref = greedy(engine), greedy(make_sampler("torch", model=b))
        for p, x, y in zip(PROMPTS, ours, ref):
            assert_same_greedy(b, p, x, y)
    finally:  # the module's engine goes back to its checkpoint
        engine.update_weights(checkpoint_tensors(saved))
