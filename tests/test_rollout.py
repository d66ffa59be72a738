"""rollout.py and sampler.py without vLLM: the torch sampler against the full forward and a numpy
reference, seeding, top-k/top-p, stops, log-probs, weight updates (rollouts follow them), the engine
arguments and environment, the vLLM sampler's wake-up order (a recording stand-in for the engine),
the tokenizers and the small helpers."""

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from model import Transformer
from rollout import fsdp_named_tensors, make_sampler
from vllm_sampler import VLLMSampler, engine_args, engine_env
from sampler import TorchSampler
from sampling import Sample
from tokenizer import (ByteTokenizer, HFTokenizer, load_tokenizer, mark_byte_tokenizer, read_json,
                       same_tokenization)

PROMPTS = [[5, 6, 7], list(range(3, 40)), [9] * 12, [40, 41, 42, 43]]


def full_logits(model, prompt, tokens):
    """(T, V): the logits that predict each of the T response tokens, from one uncached forward;
    (N, T, V) for N responses of one length."""
    rows = tokens if tokens and isinstance(tokens[0], list) else [tokens]
    with torch.no_grad():
        out = model(torch.tensor([list(prompt) + list(r) for r in rows])).float()
    out = out[:, len(prompt) - 1:len(prompt) - 1 + len(rows[0])]
    return out if rows is tokens else out[0]


def logprobs_of(model, prompt, tokens):
    """(N, T): the model's log-probabilities of N responses of one length, from one uncached
    forward."""
    t = torch.tensor(tokens)
    return full_logits(model, prompt, tokens).log_softmax(-1).gather(-1, t[..., None])[..., 0]


def reference_distribution(logits, temperature, top_k=-1, top_p=1.0):
    """The sampling distribution by hand, in numpy float64: logits / temperature, keep the top_k
    largest, then the smallest set of most likely tokens whose mass reaches top_p (vLLM's order),
    renormalised."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    keep = np.ones(z.shape, dtype=bool)
    if top_k > 0:
        keep &= z >= np.sort(z)[-top_k]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        nucleus = np.zeros_like(keep)
        mass_before = 0.0
        # a token joins while the mass of the tokens above it is still short of top_p
        for v in order:
            if mass_before >= top_p:
                break
            nucleus[v] = True
            mass_before += p[v]
        p = np.where(nucleus, p, 0.0)
        p /= p.sum()
    return p


def check_rollouts_follow_updates(sampler, student, prompts, tol):
    """distill.py's cycle: rollouts, sleep, one optimizer step on the student, update_weights (which
    wakes the sampler), rollouts. The new rollouts' log-probs must be the updated student's, and
    clearly not the initial weights'."""
    initial = copy.deepcopy(student).eval()
    kw = dict(n=2, temperature=1.0, max_new_tokens=8, stop_ids=[], logprobs=True)
    first = sampler.generate(prompts, seed=1, **kw)
    sampler.sleep()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    # raise the likelihood of the first rollouts (an SFT-like step)
    for p, samples in zip(prompts, first):
        ids = torch.tensor([p + s.tokens for s in samples])
        logits = student(ids)[:, len(p) - 1:-1]
        (-logits.log_softmax(-1).gather(-1, ids[:, len(p):, None]).mean()).backward()
    opt.step()
    sampler.update_weights(fsdp_named_tensors(student))
    for p, samples in zip(prompts, sampler.generate(prompts, seed=2, **kw)):
        tokens = [s.tokens for s in samples]
        got = torch.tensor([s.logprobs for s in samples])
        torch.testing.assert_close(got, logprobs_of(student, p, tokens), atol=tol, rtol=0)
        off_initial = (got - logprobs_of(initial, p, tokens)).abs().max()
        assert off_initial > 100 * tol, "rollouts from the old weights"


def assert_same_greedy(model, prompt, a, b, tol=1e-4):
    """Two greedy decodes agree, or part only at a near-tie (both tokens within tol of the max
    logit)."""
    for t, (x, y) in enumerate(zip(a, b)):
        if x != y:
            logits = full_logits(model, prompt, a[:t + 1])[-1]
            gap = logits.max() - min(logits[x], logits[y])
            assert gap < tol, f"greedy decodes differ at step {t}: {a} vs {b}"
            return
    assert len(a) == len(b), f"{a} vs {b}"


@pytest.fixture(scope="module")
def model(tiny_qwen3):
    return Transformer.from_pretrained(tiny_qwen3).eval()


@pytest.fixture(scope="module")
def sampler(model):
    return make_sampler("torch", model=model)


def test_greedy_is_stepwise_argmax_of_full_forward(model, sampler):
    out = sampler.generate(PROMPTS, n=2, temperature=0, max_new_tokens=12, stop_ids=[])
    assert len(out) == len(PROMPTS) and all(len(r) == 2 for r in out)
    for p, (a, b) in zip(PROMPTS, out):
        assert a == b and len(a.tokens) == 12 and a.finish == "length" and a.logprobs is None
        logits = full_logits(model, p, a.tokens)
        chosen = logits.gather(-1, torch.tensor(a.tokens)[:, None])[:, 0]
        # each token the argmax (up to float ties)
        assert (logits.max(-1).values - chosen).max() < 1e-5
        alone = sampler.generate([p], temperature=0, max_new_tokens=12, stop_ids=[])[0][0]
        assert alone.tokens == a.tokens  # left padding in a batch changes nothing


def test_seeded_runs_repeat_and_do_not_depend_on_the_batch(model, sampler):
    kw = dict(temperature=1.0, max_new_tokens=10, stop_ids=[3, 17, 100, 200], logprobs=True)
    a = sampler.generate(PROMPTS, n=3, seed=7, **kw)
    assert a == sampler.generate(PROMPTS, n=3, seed=7, **kw)
    assert a != sampler.generate(PROMPTS, n=3, seed=8, **kw)
    assert len({tuple(s.tokens) for s in a[1]}) == 3  # samples of one prompt differ
    # a row's draws depend on (seed, prompt index * n + sample index, step) only: not on later
    # prompts, nor on when finished rows are dropped (sync_every); log-probs only up to float
    # rounding (other batch shapes)
    def same(x, y):
        assert [[s.tokens for s in r] for r in x] == [[s.tokens for s in r] for r in y]
        assert [[s.finish for s in r] for r in x] == [[s.finish for s in r] for r in y]
        torch.testing.assert_close([[s.logprobs for s in r] for r in x],
                                   [[s.logprobs for s in r] for r in y])
    same(sampler.generate(PROMPTS[:2], n=3, seed=7, **kw), a[:2])
    same(TorchSampler(model=model, sync_every=4).generate(PROMPTS, n=3, seed=7, **kw), a)
    check_hand_over(sampler, PROMPTS, kw)


def check_hand_over(sampler, prompts, kw):
    """on_sample(i, j, sample) is called once for every sample, with the sample generate() then
    returns."""
    handed = []
    out = sampler.generate(prompts, n=3, seed=7,
                           on_sample=lambda i, j, s: handed.append((i, j, s)), **kw)
    assert len(handed) == 3 * len(prompts) and {(i, j) for i, j, _ in handed} == \
        {(i, j) for i in range(len(prompts)) for j in range(3)}
    assert all(out[i][j] is s for i, j, s in handed)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.5, top_k=10),
                                dict(temperature=1.0, top_p=0.5),
                                dict(temperature=0.7, top_k=50, top_p=0.8)])
def test_first_token_frequencies_match_the_distribution(model, sampler, kw):
    """20,000 samples of one step: the empirical distribution is the processed one (total variation
    near the multinomial noise floor) and excluded tokens never appear."""
    N, p = 20_000, [5, 6, 7]
    out = sampler.generate([p], n=N, max_new_tokens=1, stop_ids=[], seed=1, **kw)[0]
    V = model.config.vocab_size
    freq = torch.bincount(torch.tensor([s.tokens[0] for s in out]), minlength=V).float() / N
    reference = reference_distribution(full_logits(model, p, [0])[-1], kw["temperature"],
                                       kw.get("top_k", -1), kw.get("top_p", 1.0))
    probs = torch.from_numpy(reference).float()
    assert freq[probs == 0].sum() == 0
    # E[TV] for exact sampling
    noise_floor = 0.5 * (probs * (1 - probs) / N).sqrt().sum() * (2 / torch.pi) ** 0.5
    assert 0.5 * (freq - probs).abs().sum() < 1.5 * noise_floor


def test_noise_is_the_hash_of_python_integers_on_both_paths():
    """The CPU path hashes in numpy's wrapping uint32, the device path (a step key that is a
    tensor, as in a CUDA graph) in masked int64: both give bit for bit the Exp(1) draw of the hash
    computed on python integers, at keys near 2**32 too, where the step key's addition wraps."""
    from sampling import M32, exponential_noise, hash32
    g = torch.Generator().manual_seed(0)
    row_keys, token_keys = (torch.randint(0, 2**32, (n,), generator=g) for n in (5, 777))
    for step_key in (12345, M32 - 3):
        on_cpu = exponential_noise(row_keys, step_key, token_keys)
        on_device = exponential_noise(row_keys, torch.tensor([step_key]), token_keys)
        assert torch.equal(on_cpu, on_device)
        for r, v in ((0, 0), (4, 776), (2, 313)):
            x = hash32(((int(token_keys[v]) ^ int(row_keys[r])) + step_key) & M32)
            u = torch.tensor(float(np.float32(x)), dtype=torch.float32).add(0.5).mul(2.0**-32)
            assert on_cpu[r, v] == -torch.log1p(-u)


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.3), dict(top_k=20, top_p=0.5)])
def test_top_k_top_p_never_emit_excluded_tokens(model, sampler, kw):
    temperature = 0.7
    out = sampler.generate(PROMPTS, n=16, temperature=temperature, max_new_tokens=10, stop_ids=[],
                           seed=3, **kw)
    k = kw.get("top_k", 10**9)
    top_p = kw.get("top_p", 1.0)
    seen = set()
    for p, samples in zip(PROMPTS, out):
        tokens = [s.tokens for s in samples]
        logits = full_logits(model, p, tokens) / temperature  # (16, 10, V)
        chosen = logits.gather(-1, torch.tensor(tokens)[..., None])
        above = logits > chosen + 1e-4  # tokens ranked clearly above the chosen one
        assert (above.sum(-1) < k).all(), "a token outside the top-k was sampled"
        mass_above = (logits.softmax(-1) * above).sum(-1)
        assert (mass_above < top_p + 1e-4).all(), "a token outside the top-p nucleus was sampled"
        seen.update(sum(tokens, []))
    assert len(seen) > 10  # still sampling, not greedy


def test_stops_finish_reasons_and_lengths(model, sampler):
    # the checkpoint's eos_token_id (<|im_end|>)
    assert sampler.stop_ids == [model.config.vocab_size - 3]
    free = sampler.generate(PROMPTS, temperature=0, max_new_tokens=12, stop_ids=[])
    stop = free[0][0].tokens[4]
    out = sampler.generate(PROMPTS, temperature=0, max_new_tokens=12, stop_ids=[stop, 10**6])
    for f, (s,) in zip(free, out):
        if stop in f[0].tokens:  # cut at the first stop token, which is kept
            assert s == Sample(f[0].tokens[:f[0].tokens.index(stop) + 1], "stop")
        else:
            assert s == Sample(f[0].tokens, "length")
    assert out[0][0].finish == "stop" and len(out[0][0].tokens) <= 5
    # sampled: many rows stop at different steps and leave the batch early
    stops = set(range(0, model.config.vocab_size, 9))
    out = sampler.generate(PROMPTS, n=8, temperature=1.0, max_new_tokens=20, stop_ids=stops, seed=0,
                           logprobs=True)
    finishes = set()
    for samples in out:
        for s in samples:
            finishes.add(s.finish)
            assert len(s.logprobs) == len(s.tokens)
            assert not stops & set(s.tokens[:-1])
            if s.finish == "stop":
                assert s.tokens[-1] in stops
            else:
                assert len(s.tokens) == 20 and s.tokens[-1] not in stops
    assert finishes == {"stop", "length"}
    # stopping on the very last step is still a stop
    last = free[1][0].tokens[11]
    s = sampler.generate([PROMPTS[1]], temperature=0, max_new_tokens=12, stop_ids=[last])[0][0]
    assert s.finish == "stop" and s.tokens[-1] == last


def test_logprobs_are_the_models_log_softmax_at_the_chosen_tokens(model, sampler):
    """Raw log-probs: temperature 1 and no top-k/top-p, whatever the sampling settings."""
    for kw in (dict(temperature=0), dict(temperature=0.6, top_p=0.9, top_k=30)):
        out = sampler.generate(PROMPTS, n=2, max_new_tokens=10, stop_ids=[], seed=5, logprobs=True,
                               **kw)
        for p, samples in zip(PROMPTS, out):
            ref = logprobs_of(model, p, [s.tokens for s in samples])
            got = torch.tensor([s.logprobs for s in samples])
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_edge_cases(sampler):
    out = sampler.generate(PROMPTS, n=3, temperature=1.0, max_new_tokens=1, stop_ids=[],
                           logprobs=True)
    assert [[len(s.tokens) for s in r] for r in out] == [[1] * 3] * len(PROMPTS)
    assert sampler.generate([], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="empty prompt"):
        sampler.generate([[1, 2], []], max_new_tokens=4)


def test_update_weights_torch(tiny_qwen3, tiny_qwen3_b, model):
    """A sampler with its own copy of A, updated with B's tensors, decodes as B; sharing a model it
    is a no-op."""
    other = Transformer.from_pretrained(tiny_qwen3_b).eval()
    # vLLM-only options: ignored
    own = make_sampler("torch", tiny_qwen3, tensor_parallel_size=1, enable_sleep_mode=True,
                       max_num_seqs=4)
    before = own.generate(PROMPTS, temperature=0, max_new_tokens=8, stop_ids=[])
    own.update_weights(fsdp_named_tensors(other))
    after = own.generate(PROMPTS, temperature=0, max_new_tokens=8, stop_ids=[])
    ref = make_sampler("torch", model=other).generate(PROMPTS, temperature=0, max_new_tokens=8,
                                                      stop_ids=[])
    assert after == ref and after != before
    shared = make_sampler("torch", model=model)
    w = model.lm_head.weight.clone()
    shared.update_weights(model.named_parameters())
    assert torch.equal(w, model.lm_head.weight)
    with pytest.raises(KeyError, match="no parameter 'nope.weight'"):
        shared.update_weights([("nope.weight", w)])


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_rollouts_follow_weight_updates_torch(tiny_qwen3, decode):
    """On-policy for real: a sampler with its own copy of the student samples from the student's
    new weights."""
    sampler = make_sampler("torch", tiny_qwen3, decode=decode)
    student = Transformer.from_pretrained(tiny_qwen3)
    check_rollouts_follow_updates(sampler, student, PROMPTS, tol=1e-5)


def test_fsdp_named_tensors_plain_models(tmp_path, tiny_qwen3, model):
    from conftest import make_checkpoint
    from safetensors import safe_open
    with safe_open(os.path.join(tiny_qwen3, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    names = [n for n, _ in fsdp_named_tensors(model)]
    assert set(names) == keys and len(names) == len(keys)
    # wrapped (not run): names lose the _orig_mod. prefix
    compiled = torch.compile(model)
    assert [n for n, _ in fsdp_named_tensors(compiled)] == names
    tied_path = make_checkpoint(tmp_path, "qwen3", tied=True, tokenizer=False)
    tied = Transformer.from_pretrained(tied_path)
    assert "lm_head.weight" not in dict(fsdp_named_tensors(tied))


def test_make_sampler_refuses(tiny_qwen3):
    with pytest.raises(ValueError, match="needs model_path or model"):
        make_sampler("torch")


def test_engine_args_ask_for_bf16_on_cuda(tiny_qwen3):
    """vLLM's arguments, built without starting anything: bf16 on CUDA whatever the checkpoint
    (saved fp32) and never vLLM's 'auto'; the caller's dtype wins; on CPU the checkpoint's own
    dtype."""
    with open(os.path.join(tiny_qwen3, "config.json")) as f:
        hf = json.load(f)
    assert (hf.get("dtype") or hf.get("torch_dtype")) == "float32"
    cuda = engine_args(tiny_qwen3, hf, "cuda")
    assert cuda["dtype"] == "bfloat16" and cuda["enable_sleep_mode"]
    assert cuda["gpu_memory_utilization"] == 0.3
    assert engine_args(tiny_qwen3, hf, "cuda", dtype="auto")["dtype"] == "bfloat16"
    assert engine_args(tiny_qwen3, hf, "cuda", dtype="float16")["dtype"] == "float16"
    two = engine_args(tiny_qwen3, hf, "cuda", world=2)
    assert two["distributed_executor_backend"] == "external_launcher"
    cpu = engine_args(tiny_qwen3, hf, "cpu", max_model_len=10**6, enforce_eager=True)
    assert cpu["dtype"] == "float32" and not cpu["enable_sleep_mode"]
    assert "distributed_executor_backend" not in cpu
    assert cpu["max_model_len"] == hf["max_position_embeddings"] and cpu["enforce_eager"]


def test_engine_args_divide_the_cpu_share_among_local_ranks(tiny_qwen3, monkeypatch):
    """On a CPU each engine's default share of the node's RAM is half of it over the ranks on the
    node (torchrun's LOCAL_WORLD_SIZE, else the world): vLLM fills its share, so two ranks at half
    each would take the whole node. A GPU rank has its GPU to itself; a share given wins; vLLM-only
    options such as max_num_seqs pass through."""
    hf = read_json(os.path.join(tiny_qwen3, "config.json"))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def share(device_type="cpu", **kw):
        return engine_args(tiny_qwen3, hf, device_type, **kw)["gpu_memory_utilization"]
    assert share() == 0.5
    assert share(world=2) == 0.25
    assert share(world=8, local_world=2) == 0.25
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert share(world=8) == 0.125
    assert share(world=8, gpu_memory_utilization=0.3) == 0.3
    assert share("cuda", world=8) == 0.3
    assert engine_args(tiny_qwen3, hf, "cpu", max_num_seqs=8)["max_num_seqs"] == 8


def test_engine_env_keeps_a_lone_engine_in_this_process():
    """One process alone on CUDA or a CPU runs vLLM's engine core in this process, as every rank
    under torchrun does (there external_launcher sees to it, and on a CPU the variable hangs)."""
    in_process = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert engine_env("cuda", 1) == in_process
    assert engine_env("cpu", 1) == in_process
    assert engine_env("cuda", 8) == {}
    assert engine_env("cpu", 2) == {}


def test_fsdp_named_tensors_cast_to_the_engine_dtype(model, tiny_qwen3):
    """dtype=bf16: exactly the bf16 cast of the checkpoint's tensors; no dtype: the live
    parameters themselves (the two-rank FSDP2 case is in test_rollout_vllm)."""
    from safetensors.torch import load_file
    stored = load_file(os.path.join(tiny_qwen3, "model.safetensors"))
    got = dict(fsdp_named_tensors(model, dtype=torch.bfloat16))
    assert got.keys() == stored.keys()
    assert all(torch.equal(got[k], t.to(torch.bfloat16)) for k, t in stored.items())
    params = dict(model.named_parameters())
    assert all(t.data_ptr() == params[k].data_ptr() for k, t in fsdp_named_tensors(model))


class RecordingLLM:
    """Stands in for vllm.LLM: records the engine calls that update_weights, sleep and wake
    make."""

    def __init__(self, reset_works=True):
        self.calls = []
        self.reset_works = reset_works

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))
        return True

    def collective_rpc(self, method, args=()):
        if method == "oprd_load_weights":
            names = [name for name, _ in args[0]]
            self.calls.append((method, names))
            return [len(names)]
        self.calls.append((method,))
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return self.reset_works


def recording_sampler(llm):
    """A VLLMSampler around a RecordingLLM, as if started on a GPU with sleep mode on and the
    engine in this process (no vLLM needed)."""
    sampler = VLLMSampler.__new__(VLLMSampler)
    sampler.llm = llm
    sampler.in_process = True
    sampler.sleep_mode = True
    sampler.asleep = False
    sampler.bucket_bytes = 2**20
    return sampler


def test_update_weights_wakes_the_weights_first_then_the_kv_cache():
    """Asleep, update_weights wakes the weights alone, loads into them, resets the prefix cache, and
    only then wakes the rest (the KV cache: wake_up() with no tags is every tag still asleep).
    Awake, no wake-up at all. A prefix cache that will not reset is an error, not stale KV."""
    llm = RecordingLLM()
    sampler = recording_sampler(llm)
    weights = [("model.embed_tokens.weight", torch.zeros(2)), ("lm_head.weight", torch.zeros(2))]
    sampler.sleep()
    assert sampler.update_weights(weights) == 2 and not sampler.asleep
    sync = [("oprd_begin_update",), ("oprd_load_weights", ["model.embed_tokens.weight"]),
            ("oprd_load_weights", ["lm_head.weight"]), ("oprd_finish_update",),
            ("reset_prefix_cache",)]
    assert llm.calls == [("sleep", 1), ("wake_up", ["weights"])] + sync + [("wake_up", None)]
    llm.calls.clear()
    sampler.update_weights(weights)
    assert llm.calls == sync
    stuck = recording_sampler(RecordingLLM(reset_works=False))
    with pytest.raises(RuntimeError, match="kept its prefix cache"):
        stuck.update_weights(weights)


def test_torch_sampler_takes_bf16_on_cuda(monkeypatch, tiny_qwen3, model):
    """The dtype the torch sampler loads its own model in (the loader is replaced: no CUDA
    needed)."""
    asked = []

    def load(path, dtype=None, device=None):
        asked.append((dtype, torch.device(device).type))
        return model
    monkeypatch.setattr(Transformer, "from_pretrained", load)
    for kw in (dict(device="cuda"), dict(device="cuda", dtype="auto"),
               dict(device="cuda", dtype="float32"), dict(device="cpu")):
        TorchSampler(tiny_qwen3, **kw)
    assert asked == [(torch.bfloat16, "cuda"), (torch.bfloat16, "cuda"), (torch.float32, "cuda"),
                     (None, "cpu")]


def test_generate_refuses_no_samples_and_no_tokens(model, sampler):
    for s in (sampler, TorchSampler(model=model, decode="static")):
        with pytest.raises(ValueError, match="n=0"):
            s.generate(PROMPTS, n=0)
        with pytest.raises(ValueError, match="max_new_tokens=0"):
            s.generate(PROMPTS, max_new_tokens=0)
        with pytest.raises(ValueError, match="max_new_tokens=-1"):
            s.generate([], max_new_tokens=-1)


def broken_checkpoints(tmp_path, good):
    """{what is wrong: (folder, the message it must give)}, each a copy of the good checkpoint,
    damaged."""
    def copy(name):
        return shutil.copytree(good, tmp_path / name)

    def edit_config(path, **kw):
        with open(path / "config.json") as f:
            cfg = json.load(f)
        cfg.update(kw)
        with open(path / "config.json", "w") as f:
            json.dump(cfg, f)
        return path
    truncated = copy("truncated")
    size = os.path.getsize(truncated / "model.safetensors")
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(size // 2)
    no_weights = copy("no_weights")
    os.remove(no_weights / "model.safetensors")
    no_config = copy("no_config")
    os.remove(no_config / "config.json")
    sharded = Transformer.from_pretrained(good)
    sharded.save_pretrained(tmp_path / "sharded", max_shard_bytes=100_000)
    os.remove(tmp_path / "sharded" / "model-00002-of-00007.safetensors")
    return {"truncated": (str(truncated), "corrupt safetensors file .*incomplete metadata"),
            "no weights": (str(no_weights), "no model.safetensors"),
            "no config": (str(no_config), "no config.json"),
            "gpt2": (str(edit_config(copy("gpt2"), model_type="gpt2")), "unsupported architecture"),
            "shapes": (str(edit_config(copy("shapes"), intermediate_size=96)),
                       "do not match.*mlp.*96"),
            "missing shard": (str(tmp_path / "sharded"),
                              "shard model-00002-of-00007.safetensors .* missing"),
            "no folder": (str(tmp_path / "nope"), "no such directory")}


@pytest.mark.parametrize("backend", ["torch", "vllm", "auto"])
def test_make_sampler_checks_the_checkpoint_before_any_engine(tmp_path, tiny_qwen3, monkeypatch,
                                                              backend):
    import rollout
    from model import CheckpointError
    def engine(*a, **kw):
        pytest.fail("an engine started on a broken checkpoint")
    monkeypatch.setattr(rollout, "VLLMSampler", engine)
    monkeypatch.setattr(rollout, "TorchSampler", engine)
    for what, (path, message) in broken_checkpoints(tmp_path, tiny_qwen3).items():
        with pytest.raises(CheckpointError, match=message) as e:
            make_sampler(backend, path)
        assert "\n" not in str(e.value), what


def run_cli(*args):
    import subprocess
    import sys
    from conftest import ROOT
    return subprocess.run([sys.executable, os.path.join(ROOT, "rollout.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli(tmp_path, tiny_qwen3, capsys):
    """python rollout.py: one line `error: ...` and exit status 1 for a bad path, checkpoint or
    backend (main() in this process), usage, and one answer sampled by a process of its own."""
    import rollout

    def main(*argv):
        capsys.readouterr()
        code = 0
        try:
            rollout.main(list(argv))
        except SystemExit as e:
            code = e.code
        return (code,) + capsys.readouterr()
    truncated = broken_checkpoints(tmp_path, tiny_qwen3)["truncated"][0]
    for args, message in ((["/nope", "1+1=?", "torch"], "no such directory"),
                          ([truncated, "1+1=?", "vllm"], "corrupt safetensors file"),
                          ([tiny_qwen3, "1+1=?", "hf"], "unknown sampler backend 'hf'")):
        code, _, err = main(*args)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, err
    code, out, err = main("-h")
    assert code == 0 and out.startswith("usage: python rollout.py") and not err
    code, _, err = main(tiny_qwen3)
    assert code == 2 and err.startswith("usage:")
    r = run_cli(tiny_qwen3, "What is 12 + 30?", "torch")
    assert r.returncode == 0 and r.stdout.startswith("[TorchSampler, "), r.stderr


# ----------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 259
    assert tok.eos_ids == [256, 258] and tok.pad_id == 256
    text = "Ünïcödé ✓ 数学\n\tx = 42"
    ids = tok.encode(text)
    assert ids == list(text.encode()) and tok.decode(ids) == text
    assert tok.encode("a<|im_end|>") == [97, 258]
    ids = tok.chat("hi <|im_end|>")  # message text cannot inject a special token
    assert tok.decode(ids) == "<|im_start|>user\nhi <|im_end|><|im_end|>\n<|im_start|>assistant\n"
    assert ids.count(258) == 1
    assert ids == tok.chat([{"role": "user", "content": "hi <|im_end|>"}], enable_thinking=True)
    assert tok.decode(ids, skip_special=True) == "user\nhi <|im_end|>\nassistant\n"


def test_byte_tokenizer_checkpoint(tmp_path):
    """A checkpoint marked as speaking the byte tokenizer loads it, and keeps the mark through
    save_pretrained."""
    from conftest import make_checkpoint
    path = make_checkpoint(tmp_path / "a", "qwen3", tokenizer=False, vocab_size=259,
                           eos_token_id=[256, 258], pad_token_id=256)
    mark_byte_tokenizer(path)
    assert isinstance(load_tokenizer(path), ByteTokenizer)
    Transformer.from_pretrained(path).save_pretrained(tmp_path / "b")
    assert isinstance(load_tokenizer(str(tmp_path / "b")), ByteTokenizer)
    assert make_sampler("torch", str(tmp_path / "b")).stop_ids == [256, 258]


def test_hf_tokenizer(tiny_qwen3):
    tok = load_tokenizer(tiny_qwen3)
    assert isinstance(tok, HFTokenizer)
    V = tok.vocab_size
    # <|im_end|>, <|endoftext|> (conftest's tokenizer)
    assert tok.eos_ids == [V - 3] and tok.pad_id == V - 5
    text = "What is 12 + 30? The answer is \\boxed{42}."
    assert tok.decode(tok.encode(text)) == text
    off = tok.chat("What is 12 + 30?")
    assert off == tok.chat([{"role": "user", "content": "What is 12 + 30?"}], enable_thinking=False)
    assert tok.decode(off).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = tok.chat("What is 12 + 30?", enable_thinking=True)
    assert tok.decode(thinking).endswith("<|im_start|>assistant\n")
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tiny_qwen3)
    assert off == hf.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}],
                                         tokenize=True, add_generation_prompt=True,
                                         enable_thinking=False, return_dict=False)


def test_fingerprint(tmp_path, tiny_qwen3, tiny_qwen3_b):
    a, b = load_tokenizer(tiny_qwen3), load_tokenizer(tiny_qwen3_b)
    assert same_tokenization(a, b)  # same files, other weights
    assert not same_tokenization(a, load_tokenizer("byte"))
    assert same_tokenization(load_tokenizer("byte"), load_tokenizer("byte"))
    other = shutil.copytree(tiny_qwen3, tmp_path / "c")  # one more stop token = not interchangeable
    with open(other / "generation_config.json") as f:
        gen = json.load(f)
    gen["eos_token_id"] = [gen["eos_token_id"], a.pad_id]
    with open(other / "generation_config.json", "w") as f:
        json.dump(gen, f)
    c = load_tokenizer(str(other))
    assert c.eos_ids == sorted([a.pad_id] + a.eos_ids) and not same_tokenization(a, c)
