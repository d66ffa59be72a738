"""rollout.py's vLLM backend (the CPU build here, the same code as on GPU): parity with the torch backend, in-place
weight updates, and one engine per rank under torchrun. One engine for the module (~20 s to start); the torchrun
test starts two more, in-process (~30 s). vLLM is a requirement of the suite: these run, never skip."""

import json
import os
import subprocess
import sys

import pytest
import torch
from model import Transformer
from rollout import fsdp_named_tensors, make_sampler
from test_rollout import assert_same_greedy, full_logits

HERE = os.path.dirname(os.path.abspath(__file__))
LP_TOL = 1e-4  # fp32 log-probs, vLLM's CPU kernels vs model.py (measured: ~5e-7)


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    sampler = make_sampler("vllm", tiny_qwen3, dtype="float32", enforce_eager=True)  # eager: starts faster
    yield sampler
    sampler.close()


@pytest.fixture(scope="module")
def models(tiny_qwen3, tiny_qwen3_b):
    return Transformer.from_pretrained(tiny_qwen3).eval(), Transformer.from_pretrained(tiny_qwen3_b).eval()


@pytest.fixture(scope="module")
def prompts(engine):
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    # one prompt longer than a KV-cache block, so the prefix cache holds full blocks of it
    return [[5, 6, 7], [(3 + i) % 300 for i in range(block + 20)], [9] * 20, [40, 41, 42, 43]]


def greedy(sampler, prompts, **kw):
    return [r[0] for r in sampler.generate(prompts, temperature=0, max_new_tokens=12, **kw)]


def test_greedy_and_stops_equal_torch_backend(engine, models, prompts):
    torch_sampler = make_sampler("torch", model=models[0])
    assert engine.stop_ids == torch_sampler.stop_ids
    ours, ref = greedy(engine, prompts, stop_ids=[]), greedy(torch_sampler, prompts, stop_ids=[])
    for p, a, b in zip(prompts, ours, ref):
        assert a.finish == b.finish == "length"
        assert_same_greedy(models[0], p, a.tokens, b.tokens)
    stop = [ref[0].tokens[4], ref[2].tokens[7]]  # the stop token is kept, finish says why
    ours, ref = greedy(engine, prompts, stop_ids=stop), greedy(torch_sampler, prompts, stop_ids=stop)
    assert [(s.tokens, s.finish) for s in ours] == [(s.tokens, s.finish) for s in ref]
    assert ours[0].finish == "stop" and ours[0].tokens[-1] in stop


def test_logprobs_are_raw_and_match_torch(engine, models, prompts):
    out = engine.generate(prompts, n=3, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=10, stop_ids=[],
                          seed=3, logprobs=True)
    for p, samples in zip(prompts, out):
        assert all(len(s.logprobs) == len(s.tokens) == 10 for s in samples)
        tokens = torch.tensor([s.tokens for s in samples])
        ref = full_logits(models[0], p, tokens.tolist()).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        torch.testing.assert_close(torch.tensor([s.logprobs for s in samples]), ref, atol=LP_TOL, rtol=0)


def test_seeded_sampling_repeats(engine, prompts):
    kw = dict(n=2, temperature=1.0, top_p=0.95, max_new_tokens=8, stop_ids=[])
    a = engine.generate(prompts, seed=11, **kw)
    assert a == engine.generate(prompts, seed=11, **kw)
    assert a != engine.generate(prompts, seed=12, **kw)
    assert all(r[0].tokens != r[1].tokens for r in a)  # the n samples of a prompt differ


def test_update_weights_uses_the_new_weights(engine, models, prompts):
    """After update_weights(B) the engine decodes as B, including prompts whose KV blocks were cached under A
    (the prefix cache must be reset); streamed in small buckets, then back to A."""
    a_model, b_model = models
    ref_a = greedy(make_sampler("torch", model=a_model), prompts, stop_ids=[])
    ref_b = greedy(make_sampler("torch", model=b_model), prompts, stop_ids=[])
    before = greedy(engine, prompts, stop_ids=[])  # fills the prefix cache under A
    engine.update_weights(fsdp_named_tensors(b_model))
    after = greedy(engine, prompts, stop_ids=[])
    for p, s, r, old in zip(prompts, after, ref_b, before):
        assert_same_greedy(b_model, p, s.tokens, r.tokens)
        assert s.tokens != old.tokens
    bucket = engine.bucket_bytes
    engine.bucket_bytes = 30_000  # several tensors per bucket, several buckets
    try:
        engine.update_weights(fsdp_named_tensors(a_model))
    finally:
        engine.bucket_bytes = bucket
    for p, s, r in zip(prompts, greedy(engine, prompts, stop_ids=[]), ref_a):
        assert_same_greedy(a_model, p, s.tokens, r.tokens)


def test_two_ranks_each_sample_their_share(tmp_path, tiny_qwen3, tiny_qwen3_b, models):
    """torchrun, 2 ranks: FSDP2 students, one in-process engine per rank, each rank its own share of the prompts,
    weights streamed from the sharded model (tests/rollout_ranks.py)."""
    out = tmp_path / "ranks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "rollout_ranks.py"), tiny_qwen3, tiny_qwen3_b, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    prompts, ranks = res["prompts"], res["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["in_process"] and r["dtensor"] for r in ranks)  # external_launcher engines, FSDP2 parameters
    shares = [r["share"] for r in ranks]
    assert all(shares) and sorted(shares[0] + shares[1]) == list(range(len(prompts)))
    for key, model in (("before", models[0]), ("after", models[1])):
        ref = make_sampler("torch", model=model).generate(prompts, temperature=0, max_new_tokens=res["max_new"],
                                                         stop_ids=[])
        for r in ranks:
            for i, tokens in zip(r["share"], r[key]):
                assert_same_greedy(model, prompts[i], tokens, ref[i][0].tokens)


def test_update_weights_tied_model(tmp_path):
    """Tied embeddings (the tiny task's models, Qwen2.5-small, Qwen3 <= 4B): the update reaches the LM head too."""
    from conftest import make_checkpoint
    a = make_checkpoint(tmp_path / "a", "qwen3", tied=True, seed=7)
    b = Transformer.from_pretrained(make_checkpoint(tmp_path / "b", "qwen3", tied=True, seed=8)).eval()
    engine = make_sampler("vllm", a, dtype="float32", enforce_eager=True)
    try:
        prompts = [[5, 6, 7], [11, 12, 13, 14, 15]]
        engine.update_weights(fsdp_named_tensors(b))
        ours = greedy(engine, prompts, stop_ids=[])
        ref = greedy(make_sampler("torch", model=b), prompts, stop_ids=[])
        for p, x, y in zip(prompts, ours, ref):
            assert_same_greedy(b, p, x.tokens, y.tokens)
    finally:
        engine.close()
