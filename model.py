"""
A hand-written decoder with built-in layer taps for the qwen2 (Qwen2, Qwen2.5, R1-Distill-Qwen),
qwen3 (dense), llama (Llama 3.x, R1-Distill-Llama, SmolLM2) and phi3 (Phi-4-mini) checkpoints,
chosen by `model_type` in config.json, never guessed. One decoder; the families differ where their
checkpoints do (biases, Qwen3's q/k norms, Phi's fused projections, the RoPE variant: rope.py), and
a config feature not implemented is refused. Numerically transformers' *ForCausalLM of each family,
with Hugging Face parameter names, so a checkpoint loads by copying keys and saves as files that
transformers and vLLM load unchanged.

    model = Transformer.from_pretrained("path/to/hf_dir")  # config.json + *.safetensors
    logits = model(idx)                                      # (B, T, V)
    hs = model(idx, taps=[0, 14, 28])                        # {layer: (B, T, d)}, no LM head run
    model.save_pretrained("out/")                            # config, safetensors, tokenizer files
    # decoding: a KV cache (kvcache.py) takes the prompts, then one token per row per step
    logits = model(idx, attention_mask=mask, cache=KVCache(model, B, max_len))

Tap index convention (transformers' output_hidden_states): 0 = embeddings, l in 1..L-1 = output of
block l, L = output of the final RMSNorm (the LM-head input). A forward with taps runs no block
above the deepest tap.
"""

import json
import math
import os
import shutil
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from kvcache import sequence_inputs
from rope import Rope, apply_rope, hf_rope_parameters, read_rope

# model_type -> the transformers class it saves as
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}
SUPPORTED = tuple(ARCHITECTURES)
# files of the source checkpoint that save_pretrained copies alongside the weights
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the problem."""


@dataclass
class ModelConfig:
    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    # llama3 / longrope parameters, as rope.read_rope returns them; None: plain RoPE
    rope_scaling: dict | None = None
    # phi3: RoPE turns this share of each head's dimensions
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # qwen3, llama: q/k/v/o biases (Qwen2 always has q/k/v biases, none on o_proj)
    attention_bias: bool = False
    # llama only
    mlp_bias: bool = False

    @classmethod
    def from_hf(cls, d):
        model_type = d.get("model_type")
        if model_type not in SUPPORTED:
            raise CheckpointError(f"unsupported architecture model_type={model_type!r}: "
                                  f"this model.py implements {SUPPORTED}")
        max_len = d.get("max_position_embeddings", math.inf)
        # Phi-4-mini's sliding window is wider than its context: no window at all
        narrow_window = (d.get("sliding_window") or math.inf) < max_len
        # what each family's transformers model would do and this file does not
        not_implemented = {
            "use_sliding_window=true":
                model_type in ("qwen2", "qwen3") and d.get("use_sliding_window"),
            f"sliding_window={d.get('sliding_window')} below max_position_embeddings={max_len}":
                model_type == "phi3" and narrow_window,
            "attention_bias=true (phi3 has no attention biases)":
                model_type == "phi3" and d.get("attention_bias"),
            "mlp_bias=true (only llama has MLP biases)":
                model_type != "llama" and d.get("mlp_bias"),
            f"hidden_act={d.get('hidden_act')!r} (all four families use silu)":
                d.get("hidden_act", "silu") != "silu"}
        for what, present in not_implemented.items():
            if present:
                raise CheckpointError(f"{what} in config.json: "
                                      f"model.py does not implement it for {model_type}")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and d[f.name] is not None}
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        # Qwen2 and Phi-3 files omit head_dim
        kw.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
        try:
            theta, partial, scaling = read_rope(d, kw["head_dim"])
        except ValueError as e:
            raise CheckpointError(f"{e} ({model_type})") from None
        kw["rope_theta"] = theta
        kw["partial_rotary_factor"] = partial
        kw["rope_scaling"] = scaling
        return cls(**kw)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # as transformers computes it: normalise in fp32, cast back, then scale in the input dtype
        y = x.float()
        normed = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh = cfg.num_attention_heads
        self.nkv = cfg.num_key_value_heads
        self.hs = cfg.head_dim
        self.qkv_sizes = [self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs]
        qkv_bias = cfg.model_type == "qwen2" or cfg.attention_bias
        if cfg.model_type == "phi3":
            # one fused projection, q, k, v rows stacked, kept as the checkpoint stores it
            self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, self.qkv_sizes[0], bias=qkv_bias)
            self.k_proj = nn.Linear(cfg.hidden_size, self.qkv_sizes[1], bias=qkv_bias)
            self.v_proj = nn.Linear(cfg.hidden_size, self.qkv_sizes[2], bias=qkv_bias)
        o_bias = cfg.attention_bias and cfg.model_type != "qwen2"
        self.o_proj = nn.Linear(self.nh * self.hs, cfg.hidden_size, bias=o_bias)
        # Qwen3: per-head RMSNorm of q and k before RoPE
        self.qk_norm = cfg.model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.hs, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hs, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.nh, self.hs)
        k = k.view(B, T, self.nkv, self.hs)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # (B, nh, T, hs)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # this chunk's keys and values go into the preallocated cache; attend over all it holds
            k, v = cache.append(self.layer_idx, k, v)
        if cache is not None and cache.static:
            # a static decode step (T = 1): the nh/nkv query heads that share a kv head become
            # that head's queries, so grouped-query attention is plain attention over the cache:
            # no repeated keys, and any SDPA kernel that takes a mask can run it. The mask
            # (B, 1, 1, window) broadcasts over heads and queries.
            grouped_q = q.reshape(B, self.nkv, -1, self.hs)
            y = F.scaled_dot_product_attention(grouped_q, k, v, attn_mask=mask)
            y = y.reshape(B, self.nh, T, self.hs)
        else:
            # grouped-query attention: each kv head serves nh/nkv query heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.nkv != self.nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.model_type == "phi3":
            # gate and up fused: gate rows first, as the checkpoint stores them
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
            self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    # the `model.` prefix of the HF names: embed_tokens, layers, norm
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg, hf_config=None):
        super().__init__()
        self.config = cfg
        # the config.json it came from, written back unchanged on save
        self.hf_config = hf_config or {}
        self.source_dir = None
        # recompute each block in backward instead of keeping its activations
        self.activation_checkpointing = False
        self.model = Decoder(cfg)
        self.rope = Rope(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, idx, attention_mask=None, taps=None, cache=None, last_only=False, rows=None):
        """idx (B, T) token ids. attention_mask (B, T): 1 for real tokens, 0 for padding (left or
        right).

        Returns logits (B, T, V) (or (B, 1, V) with last_only), or with taps {layer: hidden (B, T,
        d)}; with rows (B, T) bool too, {layer: hidden at those positions (N, d)}, so no full tap
        outlives its layer (a teacher keeps only what a loss reads). With a cache (kvcache.py), idx
        is the next chunk of every row and the cache is advanced.
        """
        B, T = idx.shape
        n_layers = self.config.num_hidden_layers
        if taps is not None:
            taps = sorted(set(int(t) for t in taps))
            if not taps or taps[0] < 0 or taps[-1] > n_layers:
                raise ValueError(f"taps {taps} out of range: this model has layers 0..{n_layers}")
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        attention_mask = attention_mask.bool()
        # a whole sequence's positions and mask follow from its padding; a cached chunk's from the
        # cache, which knows which of its slots hold what
        if cache is None:
            pos, mask = sequence_inputs(attention_mask)
        else:
            pos, mask = cache.inputs(attention_mask)

        x = self.model.embed_tokens(idx)
        # LongRoPE's frequency set: by the cache's capacity when decoding, else by each row's length
        rope_len = pos.amax(-1) + 1 if cache is None else cache.rope_len
        cos, sin = self.rope.cos_sin(pos, rope_len, x.dtype)
        hidden = {}
        if taps is not None and taps[0] == 0:
            hidden[0] = x if rows is None else x[rows]
        # early exit: nothing above the deepest tap
        n_blocks = n_layers if taps is None else min(taps[-1], n_layers)
        for i in range(n_blocks):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self.model.layers[i], x, cos, sin, mask, use_reentrant=False)
            else:
                x = self.model.layers[i](x, cos, sin, mask, cache)
            if taps is not None and i + 1 in taps and i + 1 < n_layers:
                hidden[i + 1] = x if rows is None else x[rows]
        if cache is not None:
            cache.advance(attention_mask)
        if taps is not None and taps[-1] < n_layers:
            return hidden
        x = self.model.norm(x)
        if taps is not None:
            hidden[n_layers] = x if rows is None else x[rows]
            return hidden
        return self.lm_head(x[:, -1:] if last_only else x)

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load an HF checkpoint folder (config.json + model.safetensors or a sharded index).

        check_checkpoint vets the folder from its headers first; the model is then built on the meta
        device and filled by assignment, so the weights are never in memory twice. dtype=None keeps
        the stored dtype.
        """
        path, cfg, hf_config = check_checkpoint(path)
        with torch.device("meta"):
            model = cls(cfg, hf_config)
        sd = read_safetensors(path)
        if cfg.tie_word_embeddings:
            # some tied files store the copy
            sd.pop("lm_head.weight", None)
        for k in sd:
            sd[k] = sd[k].to(device=device, dtype=dtype or sd[k].dtype)
        model.load_state_dict(sd, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            # assignment replaced the embedding Parameter; re-tie
            model.lm_head.weight = model.model.embed_tokens.weight
        model.source_dir = os.path.abspath(path)
        return model

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30, state_dict=None):
        """Write config.json + safetensors (sharded above max_shard_bytes) + the source's tokenizer
        files.

        Written into a temporary sibling folder and renamed into place, so a crash leaves no half
        checkpoint. state_dict: optional full state dict (e.g. gathered from FSDP2) to save instead
        of this module's.
        """
        sd = state_dict if state_dict is not None else self.state_dict()
        sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        if self.config.tie_word_embeddings:
            # tied checkpoints store only the embedding
            sd.pop("lm_head.weight", None)
        path = os.path.abspath(path)
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        hf = dict(self.hf_config) or to_hf_config(self.config)
        hf["dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
        hf.pop("torch_dtype", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        shards = [{}]
        size = 0
        for k in sorted(sd):
            n = sd[k].numel() * sd[k].element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = sd[k]
            size += n
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in sd.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                json.dump(index, f, indent=2)
        if self.source_dir and self.source_dir != path:
            for name in SIDE_FILES:
                src = os.path.join(self.source_dir, name)
                if os.path.isfile(src):
                    shutil.copy(src, tmp)
        # swap: an existing checkpoint is moved aside only once the new one is whole
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def to_hf_config(cfg):
    """A config.json dict for a model built from a ModelConfig (not loaded from a checkpoint)."""
    only_in = {"attention_bias": ("qwen3", "llama"), "mlp_bias": ("llama",),
               "partial_rotary_factor": ("phi3",)}
    # rope_theta and rope_scaling go into rope_parameters, below
    names = [f.name for f in fields(cfg) if f.name not in ("rope_theta", "rope_scaling")]
    d = {name: getattr(cfg, name) for name in names
         if cfg.model_type in only_in.get(name, SUPPORTED)}
    d["architectures"] = [ARCHITECTURES[cfg.model_type]]
    d["hidden_act"] = "silu"
    d["rope_parameters"] = hf_rope_parameters(cfg)
    # explicit: Phi3Config's defaults are 32000
    d.update(bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=True)
    if cfg.model_type == "phi3" and cfg.rope_scaling:
        # Phi3Config reads this copy first (default 4096)
        d["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    return d


def resolve_checkpoint(path):
    """A local folder as is; a hub id ('org/name') downloaded to the local cache when online."""
    path = str(path)
    is_local = os.path.isdir(path) or os.path.exists(path)
    if is_local or path.count("/") != 1 or path.startswith((".", "/")):
        return path
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise CheckpointError(f"{path!r} is not a local folder, "
                              "and the hub is offline (HF_HUB_OFFLINE)")
    from huggingface_hub import snapshot_download
    try:
        patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
        return snapshot_download(path, allow_patterns=patterns)
    except Exception as e:
        # no network, an unknown repo, a gated repo
        raise CheckpointError(f"could not download {path!r} from the hub: "
                              f"{type(e).__name__}: {e}") from None


def check_checkpoint(path):
    """Fail fast, with a one-line CheckpointError, before any weight is read or an engine starts
    (vLLM would fail much later, in pages of tracebacks): config.json readable, of a supported
    model_type and features; every safetensors file present with a complete header (safe_open checks
    that it covers the file); the tensors the config implies, by name and shape. Reads headers only.
    Returns (folder, ModelConfig, config.json as a dict)."""
    path = resolve_checkpoint(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a checkpoint folder (no such directory)")
    try:
        with open(os.path.join(path, "config.json")) as f:
            hf_config = json.load(f)
        cfg = ModelConfig.from_hf(hf_config)
    except FileNotFoundError:
        raise CheckpointError(f"no config.json in {path!r}: "
                              "not a Hugging Face checkpoint folder") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"unreadable config.json in {path!r}: "
                              f"{type(e).__name__}: {e}") from None
    found = read_safetensors(path, shapes_only=True)
    # the names and shapes the config implies, from the model itself (on the meta device: no memory)
    with torch.device("meta"):
        expected = {k: tuple(t.shape) for k, t in Transformer(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        # tied checkpoints store the embedding only (some store the copy anyway)
        expected.pop("lm_head.weight")
        found.pop("lm_head.weight", None)
    problems = {"missing": sorted(set(expected) - set(found)),
                "unexpected": sorted(set(found) - set(expected)),
                "mis-shaped": [f"{k} {found[k]} != {s}" for k, s in expected.items()
                               if k in found and found[k] != s]}
    if any(problems.values()):
        listed = [f"{what} {names[:4]}{'...' if len(names) > 4 else ''}"
                  for what, names in problems.items() if names]
        raise CheckpointError(f"{path}: the weights do not match the {cfg.model_type} config.json: "
                              + "; ".join(listed))
    return path, cfg, hf_config


def read_safetensors(path, shapes_only=False):
    """All tensors of a checkpoint folder, single-file or sharded, as {name: tensor} (CPU); with
    shapes_only, {name: shape} from the headers alone (a truncated file fails either way: safe_open
    checks the header)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"corrupt {index}: {type(e).__name__}: {e}") from None
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path!r}")
    sd = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"shard {name} listed in the index is missing from {path!r}")
        try:
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    sd[k] = tuple(f.get_slice(k).get_shape()) if shapes_only else f.get_tensor(k)
        except Exception as e:
            # safetensors raises its own error types for truncated or garbled files
            raise CheckpointError(f"corrupt safetensors file {file}: {e}") from None
    return sd


def checkpoints_in(out_dir):
    """distill.py's checkpoints in out_dir, oldest first (step_NNNNNNN folders, each complete: saves
    are renamed into place, so a half-written one never carries this name)."""
    if not os.path.isdir(out_dir):
        return []
    steps = sorted(d for d in os.listdir(out_dir) if d.startswith("step_") and d[5:].isdigit())
    return [os.path.join(out_dir, d) for d in steps]


def num_params(model):
    # tied weights once
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
