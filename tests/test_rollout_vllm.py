"""rollout.py's vLLM backend (the CPU build here, the same code as on GPU): the checks at engine
start, parity with the torch backend, in-place weight updates that the next rollouts follow, and one
engine per rank under torchrun. Engine starts: one for the module (~20 s), closed at its teardown,
and two more in the torchrun test's ranks. vLLM is a requirement of the suite: these run, never
skip, but on a machine whose vLLM is built for another device (a GPU node), where they would start
GPU engines."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from model import Transformer
from rollout import fsdp_named_tensors, make_sampler
from vllm_sampler import (VLLMSampler, VLLMVersionError, WeightSyncExtension, checkpoint_tensors,
                          vllm_device_type)
from sampler import TorchSampler
from test_rollout import (assert_same_greedy, check_hand_over, check_rollouts_follow_updates,
                          logprobs_of)

HERE = os.path.dirname(os.path.abspath(__file__))
# fp32 log-probs, vLLM's CPU kernels vs model.py (measured: ~5e-7)
LP_TOL = 1e-4


@pytest.fixture(scope="module")
def cpu_vllm():
    runs_on = vllm_device_type()
    # None: vLLM does not import, and the tests fail saying so
    if runs_on not in ("cpu", None):
        pytest.skip(f"these tests pin vLLM's CPU build; this vLLM runs on {runs_on}")


@pytest.fixture(scope="module")
def engine(cpu_vllm, tiny_qwen3):
    """vLLM's default engine, its core in a child process, where weights travel in serialised
    buckets (alone, rollout.py otherwise keeps the engine in this process, as test_model_vllm's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        # eager: quicker
        sampler = make_sampler("vllm", tiny_qwen3, device="cpu", dtype="float32",
                               enforce_eager=True)
        yield sampler
        # now, not at exit, when vLLM's shutdown would log to closed streams after pytest's summary
        sampler.close()


@pytest.fixture(scope="module")
def models(tiny_qwen3, tiny_qwen3_b):
    a = Transformer.from_pretrained(tiny_qwen3).eval()
    b = Transformer.from_pretrained(tiny_qwen3_b).eval()
    return a, b


@pytest.fixture(scope="module")
def prompts(engine):
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    # one prompt longer than a KV-cache block, so the prefix cache holds full blocks of it
    longer = [(3 + i) % 300 for i in range(block + 20)]
    return [[5, 6, 7], longer, [9] * 20, [40, 41, 42, 43]]


def greedy(sampler, prompts, **kw):
    return [r[0] for r in sampler.generate(prompts, temperature=0, max_new_tokens=12, **kw)]


def test_engine_start_syncs_its_own_weights(engine, tiny_qwen3):
    """At start the engine ran one whole weight sync, every checkpoint tensor through the in-place
    reload (the parity tests below then show that the round trip left the weights as they were)."""
    assert engine.synced_at_start == len(list(checkpoint_tensors(tiny_qwen3))) > 0
    assert not engine.in_process and engine.dtype == torch.float32


def test_missing_vllm_internal_fails_before_the_engine_starts(cpu_vllm, tiny_qwen3, monkeypatch):
    import vllm
    from vllm.model_executor.model_loader.reload import layerwise

    class NoEngine(vllm.LLM):
        def __init__(self, *a, **kw):
            pytest.fail("an engine started although the weight sync cannot work")
    monkeypatch.setattr(vllm, "LLM", NoEngine)
    monkeypatch.delattr(layerwise, "initialize_layerwise_reload")
    message = (r"no vllm\.model_executor\..*\.initialize_layerwise_reload; .* "
               r"written against vLLM 0\.32\.0")
    with pytest.raises(VLLMVersionError, match=message) as e:
        make_sampler("vllm", tiny_qwen3, device="cpu")
    assert "\n" not in str(e.value)


def test_worker_internals_are_named():
    """What a worker must have for the sync, checked through collective_rpc right after the engine
    starts."""
    runner = SimpleNamespace(get_model=lambda: None)
    worker = SimpleNamespace(vllm_config=object(), model_runner=runner)
    assert WeightSyncExtension.oprd_missing_internals(worker) == ["model_runner.model_config"]
    assert WeightSyncExtension.oprd_missing_internals(SimpleNamespace()) == [
        "vllm_config", "model_runner.get_model", "model_runner.model_config"]


def test_device_is_honoured(cpu_vllm, tiny_qwen3, monkeypatch):
    """A device the installed vLLM does not run on starts no engine: 'vllm' refuses in one line,
    'auto' takes the torch sampler. Here the CPU build is asked for CUDA, then (pretending a CUDA
    build) for the CPU."""
    import rollout
    import vllm
    import vllm_sampler

    class NoEngine(vllm.LLM):
        def __init__(self, *a, **kw):
            pytest.fail("an engine started on a device its build does not run on")
    monkeypatch.setattr(vllm, "LLM", NoEngine)
    with pytest.raises(ValueError, match="asked for device cuda, but this vLLM build runs on cpu"):
        make_sampler("vllm", tiny_qwen3, device="cuda")
    # where make_sampler reads it, and where the engine does
    monkeypatch.setattr(rollout, "vllm_device_type", lambda: "cuda")
    monkeypatch.setattr(vllm_sampler, "vllm_device_type", lambda: "cuda")
    with pytest.raises(ValueError, match="asked for device cpu, but this vLLM build runs on cuda"):
        make_sampler("vllm", tiny_qwen3, device="cpu")
    assert isinstance(make_sampler("auto", tiny_qwen3, device="cpu"), TorchSampler)


def test_greedy_and_stops_equal_torch_backend(engine, models, prompts):
    torch_sampler = make_sampler("torch", model=models[0])
    assert engine.stop_ids == torch_sampler.stop_ids
    ours = greedy(engine, prompts, stop_ids=[])
    ref = greedy(torch_sampler, prompts, stop_ids=[])
    for p, a, b in zip(prompts, ours, ref):
        assert a.finish == b.finish == "length"
        assert_same_greedy(models[0], p, a.tokens, b.tokens)
    # the stop token is kept, finish says why
    stop = [ref[0].tokens[4], ref[2].tokens[7]]
    ours = greedy(engine, prompts, stop_ids=stop)
    ref = greedy(torch_sampler, prompts, stop_ids=stop)
    assert [(s.tokens, s.finish) for s in ours] == [(s.tokens, s.finish) for s in ref]
    assert ours[0].finish == "stop" and ours[0].tokens[-1] in stop


def test_logprobs_are_raw_and_match_torch(engine, models, prompts):
    out = engine.generate(prompts, n=3, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=10,
                          stop_ids=[], seed=3, logprobs=True)
    for p, samples in zip(prompts, out):
        assert all(len(s.logprobs) == len(s.tokens) == 10 for s in samples)
        ref = logprobs_of(models[0], p, [s.tokens for s in samples])
        got = torch.tensor([s.logprobs for s in samples])
        torch.testing.assert_close(got, ref, atol=LP_TOL, rtol=0)


def test_seeded_sampling_repeats(engine, prompts):
    kw = dict(n=2, temperature=1.0, top_p=0.95, max_new_tokens=8, stop_ids=[])
    a = engine.generate(prompts, seed=11, **kw)
    assert a == engine.generate(prompts, seed=11, **kw)
    assert a != engine.generate(prompts, seed=12, **kw)
    # the n samples of a prompt differ
    assert all(r[0].tokens != r[1].tokens for r in a)
    check_hand_over(engine, prompts, dict(temperature=1.0, max_new_tokens=8, stop_ids=[]))


def test_update_weights_uses_the_new_weights(engine, models, prompts):
    """After update_weights(B) the engine decodes as B, including prompts whose KV blocks were
    cached under A (the prefix cache must be reset); streamed in small buckets, then back to A."""
    a_model, b_model = models
    ref_a = greedy(make_sampler("torch", model=a_model), prompts, stop_ids=[])
    ref_b = greedy(make_sampler("torch", model=b_model), prompts, stop_ids=[])
    # fills the prefix cache under A
    before = greedy(engine, prompts, stop_ids=[])
    engine.update_weights(fsdp_named_tensors(b_model))
    after = greedy(engine, prompts, stop_ids=[])
    for p, s, r, old in zip(prompts, after, ref_b, before):
        assert_same_greedy(b_model, p, s.tokens, r.tokens)
        assert s.tokens != old.tokens
    bucket = engine.bucket_bytes
    # several tensors per bucket, several buckets
    engine.bucket_bytes = 30_000
    try:
        engine.update_weights(fsdp_named_tensors(a_model))
    finally:
        engine.bucket_bytes = bucket
    for p, s, r in zip(prompts, greedy(engine, prompts, stop_ids=[]), ref_a):
        assert_same_greedy(a_model, p, s.tokens, r.tokens)


def test_rollouts_follow_weight_updates_vllm(engine, tiny_qwen3, prompts):
    """On-policy for real: after an optimizer step on the student and update_weights, the engine
    samples from the student's new weights (the rollouts' log-probs are the updated model's, not the
    initial weights')."""
    student = Transformer.from_pretrained(tiny_qwen3)
    try:
        check_rollouts_follow_updates(engine, student, prompts, tol=LP_TOL)
    # the module's engine goes back to its checkpoint
    finally:
        engine.update_weights(checkpoint_tensors(tiny_qwen3))


def test_start_line_names_the_model_runner(engine):
    """The line printed at start: the CPU build runs vLLM's V1 model runner; where a worker reports
    the V2 runner (CUDA), the line names the fallback."""
    assert engine.runner_v2 is False
    assert engine.runner == "vllm.v1.worker.cpu_model_runner.CPUModelRunner"
    assert engine.summary() == (
        "rollout: vLLM 0.32.0 engine on cpu, float32, its core in a child process, model runner V1 "
        "(vllm.v1.worker.cpu_model_runner.CPUModelRunner)")
    v2 = "vllm.v1.worker.gpu.model_runner.GPUModelRunner"
    on_gpu = SimpleNamespace(device=torch.device("cuda:0"), dtype=torch.bfloat16, in_process=True,
                             runner_v2=True, runner=v2)
    assert VLLMSampler.summary(on_gpu) == (
        "rollout: vLLM 0.32.0 engine on cuda, bfloat16, in this process, model runner V2 "
        "(vllm.v1.worker.gpu.model_runner.GPUModelRunner); VLLM_USE_V2_MODEL_RUNNER=0 falls back "
        "to V1")


def test_engine_gets_max_num_seqs_and_runs_in_this_process(cpu_vllm, tiny_qwen3, monkeypatch):
    """make_sampler's vLLM-only max_num_seqs reaches vLLM's LLM(...) arguments, and one process
    alone starts its engine with VLLM_ENABLE_V1_MULTIPROCESSING=0 (no engine starts here)."""
    import vllm
    started = []

    class Stop(Exception):
        pass

    class NoEngine(vllm.LLM):
        def __init__(self, **kw):
            started.append((kw, os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")))
            raise Stop
    monkeypatch.setattr(vllm, "LLM", NoEngine)
    # unset for the test, restored at its end
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    with pytest.raises(Stop):
        make_sampler("vllm", tiny_qwen3, device="cpu", max_num_seqs=3, decode="eager")
    (kw, multiprocessing), = started
    assert kw["max_num_seqs"] == 3 and "decode" not in kw and multiprocessing == "0"


def test_two_ranks_each_sample_their_share(cpu_vllm, tmp_path, tiny_qwen3, tiny_qwen3_b, models):
    """torchrun, 2 ranks: FSDP2 students, one in-process engine per rank, each rank its own share of
    the prompts, weights streamed from the sharded model, then one rank drawing while the other's
    engine idles (tests/rollout_ranks.py).

    With VLLM_CPU_KVCACHE_SPACE unset, as on a user's CPU run: each engine sizes its KV cache from
    its share of the node's RAM, which rollout.py divides among the node's ranks, so the two ranks
    together stay near half the RAM (at 0.5 each they would take it all).
    Then the bf16 weight sync: each rank casts its shard before the all-gather, and the tensors it
    hands over are exactly the bf16 cast of the unsharded checkpoint."""
    out = tmp_path / "ranks.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "rollout_ranks.py"), tiny_qwen3, tiny_qwen3_b, str(out)]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    prompts = res["prompts"]
    ranks = res["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    # external_launcher engines, FSDP2 parameters
    assert all(r["in_process"] and r["dtensor"] for r in ranks)
    shares = [r["share"] for r in ranks]
    assert all(shares) and sorted(shares[0] + shares[1]) == list(range(len(prompts)))
    for key, model in (("before", models[0]), ("after", models[1])):
        ref = make_sampler("torch", model=model).generate(
            prompts, temperature=0, max_new_tokens=res["max_new"], stop_ids=[])
        for r in ranks:
            for i, tokens in zip(r["share"], r[key]):
                assert_same_greedy(model, prompts[i], tokens, ref[i][0].tokens)
    # rank 0 alone draws every prompt while rank 1's engine idles: no hang, the synced weights
    assert len(ranks[0]["alone"]) == len(prompts) and ranks[1]["alone"] == []
    for i, tokens in enumerate(ranks[0]["alone"]):
        assert_same_greedy(models[1], prompts[i], tokens, ref[i][0].tokens)
    for r in ranks:
        assert r["memory_share"] == 0.25 and r["kv_cache_memory_bytes"] is None
        assert r["bf16_equal"] and r["gathered_dtypes"] == ["torch.bfloat16"]
    # vLLM fills each engine's share (KV cache = share - resident memory): 1 GiB of slack
    together = sum(r["rss"] for r in ranks)
    assert together < 0.5 * ranks[0]["ram"] + 2**30, (together, ranks[0]["ram"])
