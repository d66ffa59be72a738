"""A checkpoint saved by model.py is served by vLLM (CPU build) unchanged: same greedy text as transformers."""

import torch
from model import Transformer


def test_saved_checkpoint_loads_in_vllm(tmp_path, tiny_qwen3):
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    model = Transformer.from_pretrained(tiny_qwen3)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-1.0)  # ours, not the source's
    out = str(tmp_path / "saved")
    model.save_pretrained(out)
    prompts = [[5, 17, 42, 99, 3], [7, 8, 9, 200, 201, 202, 11]]
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = []
    for p in prompts:
        g = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        want.append(g[0, len(p):].tolist())
    llm = LLM(model=out, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    res = llm.generate([{"prompt_token_ids": p} for p in prompts],
                       SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    got = [list(r.outputs[0].token_ids) for r in res]
    assert got == want
