"""model.py against transformers: parity, taps, padding, KV cache, checkpoints and error paths."""

import json
import os
import shutil

import pytest
import torch
from conftest import make_checkpoint
from kvcache import KVCache
from model import CheckpointError, Transformer

CONFIGS = {
    "qwen2_bias_untied": dict(model_type="qwen2", tied=False),
    "qwen25_tied": dict(model_type="qwen2", tied=True),
    "qwen3_tied": dict(model_type="qwen3", tied=True),
    "qwen3_untied": dict(model_type="qwen3", tied=False),
    "qwen3_heads_x_hd_ne_hidden": dict(model_type="qwen3", hidden_size=48, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=32),
}


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def batch(vocab, B=2, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(tmp_path, name):
    kw = dict(CONFIGS[name])
    path = make_checkpoint(tmp_path, kw.pop("model_type"), tied=kw.pop("tied", False),
                           tokenizer=False, **kw)
    ref = hf_model(path)
    model = Transformer.from_pretrained(path).eval()
    assert all(p.device.type == "cpu" for p in model.parameters())
    L = model.config.num_hidden_layers
    idx = batch(model.config.vocab_size)
    with torch.no_grad():
        out = ref(idx, output_hidden_states=True)
        logits = model(idx)
        taps = model(idx, taps=range(L + 1))
    assert len(out.hidden_states) == L + 1
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)
    for layer in range(L + 1):
        torch.testing.assert_close(taps[layer], out.hidden_states[layer], atol=1e-5, rtol=0)


def test_legacy_rope_theta_config(tmp_path):
    """A pre-transformers-5 config.json (rope_theta at the top level) loads to the same model."""
    path = make_checkpoint(tmp_path, "qwen3", tokenizer=False, rope_theta=5000.0)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert "rope_parameters" in cfg  # written by transformers 5
    new = Transformer.from_pretrained(path)
    assert new.config.rope_theta == 5000.0
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    old = Transformer.from_pretrained(path)
    idx = batch(new.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(old(idx), new(idx), atol=0, rtol=0)


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3):
    return Transformer.from_pretrained(tiny_qwen3).eval()


def test_early_exit_taps_equal_full_forward(qwen3):
    idx = batch(qwen3.config.vocab_size)
    L = qwen3.config.num_hidden_layers
    calls = []
    hooks = [blk.register_forward_hook(lambda m, i, o, j=j: calls.append(j))
             for j, blk in enumerate(qwen3.model.layers)]
    head = qwen3.lm_head.register_forward_hook(lambda m, i, o: calls.append("head"))
    with torch.no_grad():
        full = qwen3(idx, taps=range(L + 1))
        calls.clear()
        part = qwen3(idx, taps=[1])
    for h in hooks + [head]:
        h.remove()
    assert calls == [0]  # only the first block ran, no LM head
    torch.testing.assert_close(part[1], full[1], atol=0, rtol=0)
    with torch.no_grad():
        assert set(qwen3(idx, taps=[0, 2])) == {0, 2}


def test_taps_at_rows_are_the_full_taps_indexed(qwen3):
    """rows= keeps only some positions of every tap (what a teacher's loss reads), in row-major
    order."""
    idx = batch(qwen3.config.vocab_size)
    L = qwen3.config.num_hidden_layers
    rows = torch.zeros(idx.shape, dtype=torch.bool)
    rows[0, 3:7] = True
    rows[1, -2:] = True
    with torch.no_grad():
        full = qwen3(idx, taps=[0, 1, L])
        some = qwen3(idx, taps=[0, 1, L], rows=rows)
    for layer in (0, 1, L):
        assert some[layer].shape == (6, qwen3.config.hidden_size)
        expected = torch.cat([full[layer][0, 3:7], full[layer][1, -2:]])
        torch.testing.assert_close(some[layer], expected, atol=0, rtol=0)


def test_taps_with_grad(qwen3):
    idx = batch(qwen3.config.vocab_size)
    hs = qwen3(idx, taps=[2])
    hs[2].pow(2).mean().backward()
    assert qwen3.model.layers[1].mlp.up_proj.weight.grad is not None
    assert qwen3.model.layers[2].mlp.up_proj.weight.grad is None  # above the tap: not run
    qwen3.zero_grad(set_to_none=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_alone(qwen3, side):
    V = qwen3.config.vocab_size
    rows = [batch(V, 1, 9, seed=1)[0], batch(V, 1, 5, seed=2)[0]]
    T = max(len(r) for r in rows)
    idx = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        idx[i, sl], mask[i, sl] = r, 1
    with torch.no_grad():
        padded = qwen3(idx, attention_mask=mask)
        tapped = qwen3(idx, attention_mask=mask, taps=[1])
        for i, r in enumerate(rows):
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            torch.testing.assert_close(padded[i, sl], qwen3(r[None])[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(tapped[1][i, sl], qwen3(r[None], taps=[1])[1][0], atol=1e-5,
                                       rtol=0)
    assert torch.isfinite(padded).all()


def test_kv_cache_decoding_equals_uncached(qwen3):
    """Greedy decoding with the cache (left-padded prefill, then one token a step) = the full
    forward."""
    V = qwen3.config.vocab_size
    prompts = [batch(V, 1, 7, seed=3)[0], batch(V, 1, 3, seed=4)[0]]
    T = max(len(p) for p in prompts)
    idx = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):], mask[i, T - len(p):] = p, 1
    steps = 6
    cache = KVCache(qwen3, 2, T + steps)
    seqs = [p.tolist() for p in prompts]
    with torch.no_grad():
        logits = qwen3(idx, attention_mask=mask, cache=cache, last_only=True)
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1)
            for i in range(2):
                ref = qwen3(torch.tensor([seqs[i]]))[0, -1]
                torch.testing.assert_close(logits[i, -1], ref, atol=1e-5, rtol=0)
                assert nxt[i].item() == ref.argmax().item()
                seqs[i].append(nxt[i].item())
            logits = qwen3(nxt[:, None], cache=cache)
    assert cache.len == T + steps


def test_bf16_close_to_transformers(tiny_qwen3):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.bfloat16).eval()
    model = Transformer.from_pretrained(tiny_qwen3, dtype=torch.bfloat16).eval()
    assert model.lm_head.weight.dtype == torch.bfloat16
    idx = batch(model.config.vocab_size)
    with torch.no_grad():
        a, b = model(idx).float(), ref(idx).logits.float()
    assert (a - b).abs().max() < 0.05 * b.abs().max()


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_transformers_loads(tmp_path, tied):
    src = make_checkpoint(tmp_path / "src", "qwen3", tied=tied)
    model = Transformer.from_pretrained(src).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # a change, so we know the saved weights are ours
    out = tmp_path / "out"
    model.save_pretrained(out)
    assert os.path.isfile(out / "tokenizer.json") and os.path.isfile(out / "tokenizer_config.json")
    ref = hf_model(out)
    idx = batch(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, model(idx), atol=1e-5, rtol=0)
    from transformers import AutoTokenizer
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.encode("12 + 30") == AutoTokenizer.from_pretrained(src).encode("12 + 30")


def test_sharded_and_single_file_loading(tmp_path, tiny_qwen3):
    model = Transformer.from_pretrained(tiny_qwen3).eval()
    model.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 2
    sharded = Transformer.from_pretrained(tmp_path / "sharded")
    idx = batch(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(sharded(idx), model(idx), atol=0, rtol=0)
        torch.testing.assert_close(hf_model(tmp_path / "sharded")(idx).logits, model(idx),
                                   atol=1e-5, rtol=0)
    # and a sharded checkpoint written by transformers itself
    hf_model(tiny_qwen3).save_pretrained(tmp_path / "hf_sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "hf_sharded" / "model.safetensors.index.json")
    with torch.no_grad():
        hf_sharded = Transformer.from_pretrained(tmp_path / "hf_sharded")
        torch.testing.assert_close(hf_sharded(idx), model(idx), atol=0, rtol=0)


def test_save_replaces_existing_checkpoint_whole(tmp_path, tiny_qwen3):
    model = Transformer.from_pretrained(tiny_qwen3)
    model.save_pretrained(tmp_path / "ck")
    model.save_pretrained(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path)) == ["ck"]


# ------------------------------------------------------------------ error paths


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def edit_config(path, **changes):
    p = os.path.join(path, "config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(p, "w") as f:
        json.dump(cfg, f)


def test_error_missing_folder_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        Transformer.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)


def test_error_corrupt_config(tmp_path, tiny_qwen3):
    path = copy_ckpt(tiny_qwen3, tmp_path / "c")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="unreadable config.json"):
        Transformer.from_pretrained(path)


def test_error_unsupported_architecture(tmp_path, tiny_qwen3):
    path = copy_ckpt(tiny_qwen3, tmp_path / "c")
    edit_config(path, model_type="gpt2")
    with pytest.raises(CheckpointError, match="unsupported architecture model_type='gpt2'"):
        Transformer.from_pretrained(path)


def test_error_missing_weights_file(tmp_path, tiny_qwen3):
    path = copy_ckpt(tiny_qwen3, tmp_path / "c")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Transformer.from_pretrained(path)


def test_error_corrupt_safetensors(tmp_path, tiny_qwen3):
    path = copy_ckpt(tiny_qwen3, tmp_path / "c")
    fp = os.path.join(path, "model.safetensors")
    with open(fp, "r+b") as f:
        f.truncate(os.path.getsize(fp) // 2)
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        Transformer.from_pretrained(path)


def test_error_missing_unexpected_misshaped_tensors(tmp_path, tiny_qwen3):
    from safetensors.torch import load_file, save_file
    path = copy_ckpt(tiny_qwen3, tmp_path / "c")
    fp = os.path.join(path, "model.safetensors")
    sd = load_file(fp)
    w = sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, fp)
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        Transformer.from_pretrained(path)
    sd["model.layers.1.mlp.up_proj.weight"] = w
    sd["model.layers.9.extra"] = w.clone()
    save_file(sd, fp)
    with pytest.raises(CheckpointError, match=r"unexpected \['model.layers.9.extra'\]"):
        Transformer.from_pretrained(path)
    del sd["model.layers.9.extra"]
    sd["model.layers.1.mlp.up_proj.weight"] = w[:, :5].contiguous()
    save_file(sd, fp)
    with pytest.raises(CheckpointError,
                       match=r"mis-shaped \['model.layers.1.mlp.up_proj.weight \(128, 5\) !="):
        Transformer.from_pretrained(path)


def test_error_missing_shard(tmp_path, tiny_qwen3):
    Transformer.from_pretrained(tiny_qwen3).save_pretrained(tmp_path / "s", max_shard_bytes=20_000)
    n_shards = len([f for f in os.listdir(tmp_path / "s") if f.startswith("model-")])
    os.remove(tmp_path / "s" / f"model-00002-of-{n_shards:05d}.safetensors")
    with pytest.raises(CheckpointError, match="shard model-00002"):
        Transformer.from_pretrained(tmp_path / "s")


def test_error_taps_out_of_range(qwen3):
    idx = batch(qwen3.config.vocab_size)
    with pytest.raises(ValueError, match="out of range"):
        qwen3(idx, taps=[qwen3.config.num_hidden_layers + 1])
    with pytest.raises(ValueError, match="out of range"):
        qwen3(idx, taps=[-1])
