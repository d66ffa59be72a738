"""model.py's llama (Llama 3.x scaling) and phi3 (fused projections, partial LongRoPE) against
transformers: parity of logits and every tap below and above the rope switch, both config.json
spellings, the published configs' shapes and frequencies, saving, ModelConfig round trips, the KV
cache across LongRoPE's switch, the torch and vLLM samplers (one engine per family), the refusals,
and one distill.py + eval.py run of a llama pair.
The tiny configs switch LongRoPE at SWITCH tokens, so "above" is short."""

import json
import os
import shutil

import pytest
import torch
from conftest import ROOT, build_tokenizer, save_perturbed
from kvcache import KVCache
from model import SUPPORTED, CheckpointError, ModelConfig, Transformer, check_checkpoint

SWITCH = 16  # original_max_position_embeddings of the tiny configs
# fp32 logits and taps against transformers (measured: 0, the same kernels in the same order)
TOL = 1e-5
LP_TOL = 1e-4  # fp32 log-probs, vLLM's CPU kernels against model.py
LONGROPE = dict(rope_type="longrope", rope_theta=10000.0,
                short_factor=[1.0 + 0.05 * i for i in range(24)],
                long_factor=[1.0 + 1.5 * i for i in range(24)])
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=SWITCH)
# head_dim 32 / 64: sizes vLLM's CPU attention serves;
# phi3 rotates 48 of 64 like Phi-4-mini 96 of 128
FAMILIES = {
    "llama": dict(hidden_size=64, head_dim=32, rope_parameters=LLAMA3),
    "phi3": dict(hidden_size=128, partial_rotary_factor=0.75,
                 original_max_position_embeddings=SWITCH, rope_parameters=LONGROPE,
                 tie_word_embeddings=True, sliding_window=None,
                 # at 0.02 a tied head over a weak residual repeats the input token
                 initializer_range=0.1),
}
PARITY = {
    "llama3_untied": ("llama", {}),
    "llama_plain_tied_smollm2": ("llama", dict(
        rope_parameters=dict(rope_type="default", rope_theta=1e5), tie_word_embeddings=True)),
    "llama_attention_and_mlp_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "phi3_longrope_tied": ("phi3", {}),
    "phi3_plain_untied_half_rotary": ("phi3", dict(
        rope_parameters=dict(rope_type="default", rope_theta=1e4), partial_rotary_factor=0.5,
        tie_word_embeddings=False)),
}


def make_family(out_dir, family, seed=0, tokenizer=True, **kw):
    """Save a tiny random LlamaForCausalLM / Phi3ForCausalLM with transformers; return the
    folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM
    vocab = build_tokenizer(out_dir) if tokenizer else 384
    args = dict(vocab_size=vocab, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5,
                eos_token_id=vocab - 3, pad_token_id=vocab - 5, bos_token_id=None,
                tie_word_embeddings=False)
    args.update(FAMILIES[family], **kw)
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                          "phi3": (Phi3Config, Phi3ForCausalLM)}[family]
    torch.manual_seed(seed)
    return save_perturbed(model_cls(cfg_cls(**args)).float(), out_dir)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("phi3"), "phi3")


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def batch(T, B=2, seed=0, vocab=256):  # ids every tiny vocabulary has
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def read_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def write_config(path, cfg):
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


# ------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", list(PARITY))
def test_parity_with_transformers_below_and_above_the_switch(tmp_path, name):
    family, kw = PARITY[name]
    path = make_family(tmp_path, family, tokenizer=False, **kw)
    ref, model = hf_model(path), Transformer.from_pretrained(path).eval()
    L = model.config.num_hidden_layers
    for T in (SWITCH - 5, SWITCH, SWITCH + 1, 3 * SWITCH):
        idx = batch(T, seed=T)
        with torch.no_grad():
            out = ref(idx, output_hidden_states=True)
            logits, taps = model(idx), model(idx, taps=range(L + 1))
        torch.testing.assert_close(logits, out.logits, atol=TOL, rtol=0)
        for layer in range(L + 1):
            torch.testing.assert_close(taps[layer], out.hidden_states[layer], atol=TOL, rtol=0)


def test_the_tiny_configs_exercise_their_rope(llama, phi3):
    """Non-vacuous parity: llama3 scaling moves the frequencies away from plain RoPE, and per
    transformers a sequence past the switch changes the logits of its first positions (the long
    set, everywhere)."""
    ref = hf_model(llama)
    plain = 1.0 / (LLAMA3["rope_theta"] ** (torch.arange(0, 32, 2).float() / 32))
    assert (ref.model.rotary_emb.inv_freq - plain).abs().max() > 1e-3
    ref, idx = hf_model(phi3), batch(3 * SWITCH)
    with torch.no_grad():
        long, short = ref(idx).logits[:, :SWITCH], ref(idx[:, :SWITCH]).logits
    assert (long - short).abs().max() > 1e-2
    assert ref.model.rotary_emb.attention_scaling > 1  # sqrt(1 + ln(64/16) / ln(16))


def test_longrope_set_is_chosen_per_row(phi3):
    """A right-padded batch of a row above the switch and one below: each row equals transformers
    on it alone (transformers itself would give the short row the long set, chosen on the batch's
    longest row)."""
    ref, model = hf_model(phi3), Transformer.from_pretrained(phi3).eval()
    rows = [batch(3 * SWITCH, 1, seed=1)[0], batch(SWITCH - 4, 1, seed=2)[0]]
    idx = torch.zeros(2, 3 * SWITCH, dtype=torch.long)
    mask = torch.zeros(2, 3 * SWITCH, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, :len(r)], mask[i, :len(r)] = r, 1
    with torch.no_grad():
        padded = model(idx, attention_mask=mask)
        for i, r in enumerate(rows):
            torch.testing.assert_close(padded[i, :len(r)], ref(r[None]).logits[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("length", [SWITCH, SWITCH + 1])
def test_longrope_switches_one_token_past_the_original_context(phi3, length):
    """A sequence of exactly original_max_position_embeddings tokens uses LongRoPE's short set, one
    token more the long set, as transformers does: in a full forward, and in decoding with a cache
    of exactly that capacity (a prompt, then one token a step)."""
    ref, model = hf_model(phi3), Transformer.from_pretrained(phi3).eval()
    idx = batch(length, 1, seed=7)
    prompt = length - 4
    with torch.no_grad():
        want = ref(idx).logits[0]
        full = model(idx)[0]
        cache = KVCache(model, 1, length)
        ones = torch.ones(1, prompt, dtype=torch.long)
        steps = [model(idx[:, :prompt], attention_mask=ones, cache=cache)[0]]
        for t in range(prompt, length):
            steps.append(model(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(full, want, atol=TOL, rtol=0)
    torch.testing.assert_close(torch.cat(steps), want, atol=TOL, rtol=0)


def legacy_spelling(cfg):
    """A transformers-5 config.json rewritten as older files spell it: rope_theta,
    partial_rotary_factor (and Phi's original_max_position_embeddings) at the top level,
    rope_scaling holding the scaling keys (Phi-4-mini spells its type 'type', Llama 3.2
    'rope_type')."""
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    if cfg["model_type"] == "phi3":
        rope["type"] = rope.pop("rope_type")
        rope.pop("original_max_position_embeddings")
    cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    return cfg


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_older_config_spelling_is_the_same_model(tmp_path, request, family):
    src = request.getfixturevalue(family)
    path = shutil.copytree(src, tmp_path / "old")
    write_config(path, legacy_spelling(read_config(path)))
    assert "rope_parameters" not in read_config(path)
    new, old = Transformer.from_pretrained(src).eval(), Transformer.from_pretrained(path).eval()
    assert old.config == new.config
    idx = batch(3 * SWITCH)
    with torch.no_grad():
        torch.testing.assert_close(old(idx), new(idx), atol=0, rtol=0)
        torch.testing.assert_close(old(idx), hf_model(path)(idx).logits, atol=TOL, rtol=0)


LLAMA_3 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=131072,
               rope_theta=500000.0, hidden_act="silu", rms_norm_eps=1e-5, attention_bias=False,
               mlp_bias=False, pretraining_tp=1)
# the fields that shape the model, as the published config.json files spell them
# (2 layers, for time)
PUBLISHED = {
    "Llama-3.2-1B": dict(
        LLAMA_3, hidden_size=2048, intermediate_size=8192, num_attention_heads=32, head_dim=64,
        num_key_value_heads=8, tie_word_embeddings=True,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3")),
    "DeepSeek-R1-Distill-Llama-8B": dict(
        LLAMA_3, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, tie_word_embeddings=False,
        rope_scaling=dict(factor=8.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3")),
    "SmolLM2-135M": dict(
        LLAMA_3, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000, rope_scaling=None,
        tie_word_embeddings=True),
    "Phi-4-mini": dict(
        model_type="phi3", vocab_size=200064, hidden_size=3072, intermediate_size=8192,
        num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
        original_max_position_embeddings=4096, partial_rotary_factor=0.75, rope_theta=10000.0,
        rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.01 * i for i in range(48)],
                          long_factor=[1.0 + 0.5 * i for i in range(48)]),
        sliding_window=262144, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        lm_head_bias=False, full_attn_mod=1, interpolate_factor=1, hidden_act="silu",
        rms_norm_eps=1e-5),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_build_what_transformers_builds(name):
    """The families' real shapes and rope settings (no weights): the same tensors by name and
    shape as transformers' model of the config, the same inverse frequencies (both LongRoPE sets)
    and attention factor."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    d = dict(PUBLISHED[name], num_hidden_layers=2)
    hf_cfg = AutoConfig.for_model(**d)
    with torch.device("meta"):
        ref, model = AutoModelForCausalLM.from_config(hf_cfg), Transformer(ModelConfig.from_hf(d))
    shapes = {k: t.shape for k, t in model.state_dict().items()}
    ref_shapes = {k: t.shape for k, t in ref.state_dict().items()}
    assert shapes == ref_shapes
    rotary = type(ref.model.rotary_emb)(hf_cfg)  # on the CPU: the short (or only) set
    sets = [rotary.inv_freq] + ([ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, "cpu", seq_len=4097)[0]]
                                if name == "Phi-4-mini" else [])
    torch.testing.assert_close(model.rope.inv_freq, torch.stack(sets), atol=0, rtol=0)
    assert model.rope.scale == rotary.attention_scaling


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_save_is_key_for_key_and_transformers_reloads_it(tmp_path, request, family):
    from safetensors import safe_open
    src = request.getfixturevalue(family)
    model = Transformer.from_pretrained(src).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # a change, so we know the saved weights are ours
    out = tmp_path / "out"
    model.save_pretrained(out)
    keys = [set(safe_open(os.path.join(d, "model.safetensors"), "pt").keys()) for d in (src, out)]
    # fused qkv_proj / gate_up_proj under their HF names; a tied head not stored
    assert keys[0] == keys[1]
    assert ("lm_head.weight" in keys[1]) == (family == "llama")
    assert read_config(out) == read_config(src)
    assert os.path.isfile(out / "tokenizer.json")
    idx = batch(3 * SWITCH)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(idx).logits, model(idx), atol=TOL, rtol=0)


def model_config(family):
    """A ModelConfig like the tiny checkpoints of each family (for models built from scratch, as
    tiny.py does)."""
    shape = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 max_position_embeddings=64, rope_theta=10000.0)
    if family == "llama":
        scaling = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
        shape.update(rope_theta=LLAMA3["rope_theta"], rope_scaling=scaling, attention_bias=True)
    if family == "phi3":
        shape.update(hidden_size=128, head_dim=64, partial_rotary_factor=0.75,
                     tie_word_embeddings=True,
                     rope_scaling=dict(rope_type="longrope",
                                       short_factor=LONGROPE["short_factor"],
                                       long_factor=LONGROPE["long_factor"],
                                       original_max_position_embeddings=SWITCH))
    return ModelConfig(model_type=family, **shape)


@pytest.mark.parametrize("family", SUPPORTED)
def test_a_model_config_saves_a_checkpoint_transformers_reads(tmp_path, family):
    cfg = model_config(family)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.save_pretrained(tmp_path)
    assert ModelConfig.from_hf(read_config(tmp_path)) == cfg
    idx = batch(3 * SWITCH)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tmp_path)(idx).logits, model(idx), atol=TOL, rtol=0)


# ------------------------------------------------------------------ KV cache and samplers


def cached_logits(model, prompt, tokens, capacity):
    """(len(tokens), V): the logits that predict each token as a decode with a cache of this
    capacity computes them, teacher-forced in one prefill."""
    with torch.no_grad():
        out = model(torch.tensor([list(prompt) + list(tokens)]), cache=KVCache(model, 1, capacity))
    return out[0, len(prompt) - 1:-1]


@pytest.mark.parametrize("case, prompt_lens, steps", [("llama", (7, 3), 12), ("phi3", (7, 3), 6),
                                                      ("phi3", (9, 5), 16)])
def test_kv_cache_decoding(request, case, prompt_lens, steps):
    """Greedy decoding with the cache (left-padded prefill, then one token a step) against the full
    forward. LongRoPE's set is the cache's (by its capacity, prompt + steps): within the switch
    every step equals the full forward; with a capacity above it, the steps whose sequence is past
    the switch do, and those before it differ (the full forward of a short sequence uses the short
    set) -- the documented choice, as in vLLM."""
    model = Transformer.from_pretrained(request.getfixturevalue(case)).eval()
    prompts = [batch(n, 1, seed=n)[0].tolist() for n in prompt_lens]
    T = max(prompt_lens)
    idx, mask = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    cache = KVCache(model, 2, T + steps)
    long_cache = case == "phi3" and T + steps > SWITCH
    seqs, differ = [list(p) for p in prompts], 0
    with torch.no_grad():
        logits = model(idx, attention_mask=mask, cache=cache, last_only=True)
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1)
            for i in range(2):
                ref = model(torch.tensor([seqs[i]]))[0, -1]
                if long_cache and len(seqs[i]) <= SWITCH:
                    differ += (logits[i, -1] - ref).abs().max().item() > 1e-3
                else:
                    torch.testing.assert_close(logits[i, -1], ref, atol=TOL, rtol=0)
                    assert nxt[i].item() == ref.argmax().item()
                seqs[i].append(nxt[i].item())
            logits = model(nxt[:, None], cache=cache)
    assert differ == (sum(SWITCH + 1 - n for n in prompt_lens) if long_cache else 0)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_torch_and_vllm_samplers_agree(tmp_path, request, family):
    """Greedy rollouts of prompts below the switch that decode past it, from the torch sampler
    (eager and static decode loops) and vLLM (one engine, serving the checkpoint model.py saved):
    the same tokens, each the argmax of the cached decode's logits, with the same log-probs. All
    three use LongRoPE's long set here: the torch sampler's cache capacity is above the switch, and
    so is vLLM's max_model_len (vLLM's default for a LongRoPE model stops at the switch, with the
    short set)."""
    from rollout import make_sampler
    model = Transformer.from_pretrained(request.getfixturevalue(family)).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(-1.0)  # ours, not the source's
    path = str(tmp_path / "saved")
    model.save_pretrained(path)
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42, 43, 44], list(range(3, 13))]
    kw = dict(temperature=0, max_new_tokens=14, stop_ids=[], logprobs=True)
    runs = {decode: make_sampler("torch", model=model, decode=decode).generate(prompts, **kw)
            for decode in ("eager", "static")}
    engine = make_sampler("vllm", path, dtype="float32", enforce_eager=True, max_model_len=64)
    try:
        runs["vllm"] = engine.generate(prompts, **kw)
    finally:
        engine.close()
    for i, p in enumerate(prompts):
        ref = runs["eager"][i][0]
        assert len(p) + len(ref.tokens) > SWITCH
        lp = cached_logits(model, p, ref.tokens, capacity=64).log_softmax(-1)
        chosen = lp.gather(-1, torch.tensor(ref.tokens)[:, None])[:, 0]
        assert (lp.max(-1).values - chosen).max() < 1e-5
        for name in ("static", "vllm"):
            s = runs[name][i][0]
            t = next((t for t, (x, y) in enumerate(zip(s.tokens, ref.tokens)) if x != y),
                     len(ref.tokens))
            assert (t == len(ref.tokens)
                    or lp[t].max() - min(lp[t, s.tokens[t]], lp[t, ref.tokens[t]]) < LP_TOL), name
            torch.testing.assert_close(torch.tensor(s.logprobs[:t]), chosen[:t], atol=LP_TOL,
                                       rtol=0)


# ------------------------------------------------------------------ what is not implemented


@pytest.mark.parametrize("family, change, message", [
    ("llama", dict(rope_parameters=dict(LLAMA3, rope_type="yarn")),
     r"rope_type='yarn' is not implemented"),
    ("llama", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)),
     "rope_type='dynamic'"),
    ("llama", dict(rope_parameters={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}),
     r"rope_type='llama3' needs \['low_freq_factor'\]"),
    ("llama", dict(partial_rotary_factor=0.5),
     "partial_rotary_factor=0.5 in config.json is implemented for phi3 only"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("phi3", dict(sliding_window=8), "sliding_window=8 below max_position_embeddings=64"),
    ("phi3", dict(attention_bias=True), r"attention_bias=true \(phi3 has no attention biases\)"),
    ("phi3", dict(mlp_bias=True), r"mlp_bias=true \(only llama has MLP biases\)"),
    ("phi3", dict(rope_parameters=dict(LONGROPE, long_factor=[1.0] * 32)), "need 24 entries each"),
])
def test_unimplemented_config_features_are_refused(tmp_path, request, family, change, message):
    path = shutil.copytree(request.getfixturevalue(family), tmp_path / "c")
    write_config(path, dict(read_config(path), **change))
    with pytest.raises(CheckpointError, match=message) as e:
        check_checkpoint(path)
    assert "\n" not in str(e.value)


def test_a_sliding_window_wider_than_the_context_is_no_window(tmp_path, phi3):
    """Phi-4-mini's config.json has sliding_window=262144 over a 131072 context: it never acts, and
    loads."""
    path = shutil.copytree(phi3, tmp_path / "c")
    write_config(path, dict(read_config(path), sliding_window=128))
    ref, model = hf_model(path), Transformer.from_pretrained(path).eval()
    idx = batch(3 * SWITCH)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx).logits, atol=TOL, rtol=0)


# ------------------------------------------------------------------ distill.py and eval.py


def test_distill_then_eval_a_llama_pair(tmp_path, settings_restored, monkeypatch, capsys):
    """One OPRD run (2 steps, torch backend, one process) with a llama teacher and student that
    share a tokenizer, then eval.py on the student it saved (both main()s in this process)."""
    import eval as ev
    from test_bad_input import main_in_process
    teacher = make_family(tmp_path / "teacher", "llama", seed=3, max_position_embeddings=512)
    student = make_family(tmp_path / "student", "llama", seed=4, max_position_embeddings=512)
    out, res = tmp_path / "out", tmp_path / "res"
    bench = os.path.join(ROOT, "tests", "fixtures", "mini_bench.jsonl")
    args = dict(student=student, teacher=teacher, out_dir=out, prompts=bench, backend="torch",
                device="cpu", method="oprd", prompts_per_step=2, n_samples=2, max_new_tokens=6,
                max_prompt_len=256, layers="all", positions="last_k", k_positions=4, max_steps=2,
                micro_batch_size=4, lr=1e-3, warmup_frac=0.0, seed=0)
    eval_args = dict(ckpt=out / "step_0000002", benchmarks=bench, out=res, n_samples=1,
                     max_new_tokens=6, backend="torch", limit=2)
    for main, script, a in ((settings_restored.main, "distill.py", args),
                            (ev.main, "eval.py", eval_args)):
        argv = [script] + [f"--{k}={v}" for k, v in a.items()]
        code, stdout, err = main_in_process(main, argv, monkeypatch, capsys)
        assert code == 0, f"{script}: exit {code}\n{stdout[-2000:]}\n" + "\n".join(err[-40:])
    with open(out / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [0, 1]
    saved = Transformer.from_pretrained(out / "step_0000002")
    assert saved.config == Transformer.from_pretrained(student).config  # still llama, llama3 rope
    with open(res / "summary.json") as f:
        assert 0 <= next(iter(json.load(f).values()))["avg@1"] <= 1
