"""
A hand-written decoder with built-in layer taps for the qwen2 (Qwen2, Qwen2.5, R1-Distill-Qwen), qwen3 (dense),
llama (Llama 3.x, R1-Distill-Llama, SmolLM2) and phi3 (Phi-4-mini) checkpoints, chosen by `model_type` in
config.json, never guessed. One decoder; the families differ where their checkpoints do (biases, Qwen3's q/k
norms, Phi's fused projections, the RoPE variant: rope.py), and a config feature not implemented is refused.
Numerically transformers' *ForCausalLM of each family, with Hugging Face parameter names, so a checkpoint
loads by copying keys and saves as files that transformers and vLLM load unchanged.

    model = Transformer.from_pretrained("path/to/hf_dir")     # config.json + *.safetensors
    logits = model(idx)                                         # (B, T, V)
    hs = model(idx, taps=[0, 14, 28])                           # {layer: (B, T, d)}, no LM head computed
    model.save_pretrained("out/")                               # config + safetensors + tokenizer files

Tap index convention (transformers' output_hidden_states): 0 = embeddings, l in 1..L-1 = output of block l,
L = output of the final RMSNorm (the LM-head input). A forward with taps runs no block above the deepest tap.
"""

import copy
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

from rope import Rope, apply_rope, hf_rope_parameters, read_rope

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
                 "phi3": "Phi3ForCausalLM"}  # model_type -> the transformers class it saves as
SUPPORTED = tuple(ARCHITECTURES)
# files of the source checkpoint that save_pretrained copies alongside the weights
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja", "generation_config.json")


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
    rope_scaling: dict | None = None  # llama3 / longrope parameters, as rope.read_rope returns them; None: plain
    partial_rotary_factor: float = 1.0  # phi3: RoPE turns this share of each head's dimensions
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen3, llama: q/k/v/o biases (Qwen2 always has q/k/v biases, none on o_proj)
    mlp_bias: bool = False  # llama only

    @classmethod
    def from_hf(cls, d):
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise CheckpointError(f"unsupported architecture model_type={mt!r}: this model.py implements {SUPPORTED}")
        max_len = d.get("max_position_embeddings", math.inf)
        not_implemented = {  # what each family's transformers model would do and this file does not
            "use_sliding_window=true": mt in ("qwen2", "qwen3") and d.get("use_sliding_window"),
            f"sliding_window={d.get('sliding_window')} below max_position_embeddings={max_len}":
                mt == "phi3" and (d.get("sliding_window") or math.inf) < max_len,  # Phi-4-mini's window is wider
            "attention_bias=true (phi3 has no attention biases)": mt == "phi3" and d.get("attention_bias"),
            "mlp_bias=true (only llama has MLP biases)": mt != "llama" and d.get("mlp_bias"),
            f"hidden_act={d.get('hidden_act')!r} (all four families use silu)": d.get("hidden_act", "silu") != "silu"}
        for what, present in not_implemented.items():
            if present:
                raise CheckpointError(f"{what} in config.json: model.py does not implement it for {mt}")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and d[f.name] is not None}
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        kw.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])  # Qwen2 and Phi-3 files omit it
        try:
            kw["rope_theta"], kw["partial_rotary_factor"], kw["rope_scaling"] = read_rope(d, kw["head_dim"])
        except ValueError as e:
            raise CheckpointError(f"{e} ({mt})") from None
        return cls(**kw)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # as transformers computes it: normalise in fp32, cast back, then scale in the input dtype
        y = x.float()
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hs = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_sizes = [self.nh * self.hs, self.nkv * self.hs, self.nkv * self.hs]
        qkv_bias = cfg.model_type == "qwen2" or cfg.attention_bias
        if cfg.model_type == "phi3":  # one fused projection, q, k, v rows stacked, kept as the checkpoint stores it
            self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=False)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, self.qkv_sizes[0], bias=qkv_bias)
            self.k_proj = nn.Linear(cfg.hidden_size, self.qkv_sizes[1], bias=qkv_bias)
            self.v_proj = nn.Linear(cfg.hidden_size, self.qkv_sizes[2], bias=qkv_bias)
        o_bias = cfg.attention_bias and cfg.model_type != "qwen2"
        self.o_proj = nn.Linear(self.nh * self.hs, cfg.hidden_size, bias=o_bias)
        self.qk_norm = cfg.model_type == "qwen3"
        if self.qk_norm:  # Qwen3: per-head RMSNorm of q and k before RoPE
            self.q_norm = RMSNorm(self.hs, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hs, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        if hasattr(self, "qkv_proj"):  # phi3
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(B, T, self.nh, self.hs), k.view(B, T, self.nkv, self.hs)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this chunk's keys/values into the preallocated cache, attend over all
            k, v = cache.append(self.layer_idx, k, v)
        if cache is not None and cache.window is not None:
            # static decode step (T = 1): the nh/nkv query heads that share a kv head become that head's queries,
            # so grouped-query attention is plain attention over the cache: no repeated keys, and any SDPA
            # kernel that takes a mask can run it. mask (B, 1, 1, window) broadcasts over heads and queries.
            y = F.scaled_dot_product_attention(q.reshape(B, self.nkv, -1, self.hs), k, v, attn_mask=mask)
            y = y.reshape(B, self.nh, T, self.hs)
        else:  # grouped-query attention: each kv head serves nh/nkv query heads
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.nkv != self.nh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.model_type == "phi3":  # gate and up fused: gate rows first, as the checkpoint stores them
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
            self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):  # phi3
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


class KVCache:
    """Preallocated keys/values for batched decoding: prefill once, then one token per row per step.

    Rows may have different lengths (left padding in the prefill); `valid` remembers which slots hold
    real tokens and `next_pos` each row's next position id, so a padded row decodes as it would alone.

    Two ways to decode with it. Eager: `len` (a python int) slots are written and a step attends to exactly
    those; select() drops finished rows by copying the cache. Static shapes (rollout.py's StaticDecoder, for
    CUDA graphs): a view from narrow(rows, window) writes each row's token at `slot`, a 1-element device
    tensor the forward itself advances, and attends to the first `window` slots with the unwritten ones
    masked, so a step's shapes and tensor addresses depend on (rows, window) only, never on the step.
    """

    def __init__(self, model, batch_size, max_len, dtype=None, device=None):
        c = model.config
        p = model.model.embed_tokens.weight
        dtype, device = dtype or p.dtype, device or p.device
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.num_hidden_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.len = 0  # slots written so far (same for every row)
        self.rope_len = max_len  # picks LongRoPE's frequency set for all this cache holds (rope.Rope.cos_sin)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # static decoding: the slot written next
        self.window = None  # static decoding: slots a step attends to (None: eager)

    def append(self, layer, k, v):
        if self.window is not None:  # static: one token per row at `slot`; index_copy_ takes the slot as a tensor
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer][:, :, :self.window], self.v[layer][:, :, :self.window]
        T = k.shape[2]
        self.k[layer][:, :, self.len:self.len + T] = k
        self.v[layer][:, :, self.len:self.len + T] = v
        return self.k[layer][:, :, :self.len + T], self.v[layer][:, :, :self.len + T]

    def select(self, rows):
        """Keep only these rows (e.g. drop finished samples); rows is a LongTensor of indices."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.valid, self.next_pos = self.valid[rows], self.next_pos[rows]

    def narrow(self, rows, window=None):
        """A cache over the first `rows` rows that shares this one's memory (its writes land here); with a
        window, set for static-shape decode steps (see the class docstring)."""
        view = copy.copy(self)  # slot, len: shared / copied as they are
        view.k, view.v = [t[:rows] for t in self.k], [t[:rows] for t in self.v]
        view.valid, view.next_pos, view.window = self.valid[:rows], self.next_pos[:rows], window
        return view

    def step_inputs(self):
        """Marks `slot` written; returns the positions (B, 1) and the additive attention mask (B, 1, 1, window)
        of a static decode step. The mask is built once per step, not converted from bool in every layer."""
        self.valid.index_fill_(1, self.slot, True)
        mask = torch.zeros(self.valid.shape[0], 1, 1, self.window, dtype=self.k[0].dtype, device=self.valid.device)
        return self.next_pos[:, None], mask.masked_fill_(~self.valid[:, None, None, :self.window], float("-inf"))


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
        self.hf_config = hf_config or {}  # the config.json it came from, written back unchanged on save
        self.source_dir = None
        self.activation_checkpointing = False  # recompute each block in backward instead of keeping activations
        self.model = Decoder(cfg)
        self.rope = Rope(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, idx, attention_mask=None, taps=None, cache=None, last_only=False, rows=None):
        """idx (B, T) token ids. attention_mask (B, T): 1 for real tokens, 0 for padding (left or right).

        Returns logits (B, T, V) (or (B, 1, V) with last_only), or with taps={layer: hidden (B, T, d)}; with rows
        (B, T) bool too, {layer: hidden at those positions (N, d)}, so no full tap outlives its layer (a teacher
        keeps only what a loss reads). With a cache, idx is the next chunk of every row and the cache is advanced.
        """
        (B, T), L = idx.shape, self.config.num_hidden_layers
        if taps is not None:
            taps = sorted(set(int(t) for t in taps))
            if not taps or taps[0] < 0 or taps[-1] > L:
                raise ValueError(f"taps {taps} out of range: this model has layers 0..{L}")
        static = cache is not None and cache.window is not None
        step = cache is not None and not static and T == 1 and attention_mask is None
        if step:  # an eager decode step: each row's token goes to slot cache.len and attends to its written slots
            cache.valid[:, cache.len] = True  # the mask the general case builds, read from the cache: (B, 1, 1, S)
            pos, mask = cache.next_pos[:, None], cache.valid[:, None, None, :cache.len + 1]
        elif static:  # a static-shape decode step: one token per row at slot cache.slot (see KVCache)
            if T != 1:
                raise ValueError(f"a static-shape cache step takes one token per row, got {T}")
            pos, mask = cache.step_inputs()
        else:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device) if attention_mask is None \
                else attention_mask.bool()
            # position ids count real tokens only, so a left-padded row gets the positions it would get alone
            pos = attention_mask.long().cumsum(-1) - 1
            if cache is not None:
                pos = pos + cache.next_pos[:, None]
                cache.valid[:, cache.len:cache.len + T] = attention_mask
                keys_valid = cache.valid[:, :cache.len + T]
                S, offset = cache.len + T, cache.len
            else:
                keys_valid, S, offset = attention_mask, T, 0
            pos = pos.clamp(min=0)
            if cache is None and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
                # no left padding (training batches are right-padded): plain causal attention is exact for every
                # real token, and without an explicit mask SDPA can use its flash kernels (no T x T matrix at 16k)
                mask = None
            else:  # (B, 1, T, S): causal and not padding; a padded query attends to itself so no row is all -inf
                qi = torch.arange(T, device=idx.device)[:, None] + offset
                kj = torch.arange(S, device=idx.device)[None, :]
                mask = (kj <= qi)[None] & keys_valid[:, None, :]
                mask = (mask | (kj == qi)[None])[:, None]

        x = self.model.embed_tokens(idx)
        # LongRoPE's frequency set: by the cache's capacity when decoding, else by each row's length (Rope.cos_sin)
        cos, sin = self.rope.cos_sin(pos, cache.rope_len if cache is not None else pos.amax(-1) + 1, x.dtype)
        out, pick = {}, (lambda h: h) if rows is None else (lambda h: h[rows])
        if taps is not None and taps[0] == 0:
            out[0] = pick(x)
        n_blocks = L if taps is None else min(taps[-1], L)  # early exit: nothing above the deepest tap
        for i in range(n_blocks):
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self.model.layers[i], x, cos, sin, mask, use_reentrant=False)
            else:
                x = self.model.layers[i](x, cos, sin, mask, cache)
            if taps is not None and i + 1 in taps and i + 1 < L:
                out[i + 1] = pick(x)
        if static:  # in place, so the next replay of a recorded step reads the advanced values
            cache.slot += 1
            cache.next_pos += 1
        elif cache is not None:
            cache.len += T
            cache.next_pos += 1 if step else attention_mask.long().sum(-1)
        if taps is not None and taps[-1] < L:
            return out
        x = self.model.norm(x)
        if taps is not None:
            out[L] = pick(x)
            return out
        return self.lm_head(x[:, -1:] if last_only else x)

    # ------------------------------------------------------------------ checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load an HF checkpoint folder (config.json + model.safetensors or a sharded index).

        check_checkpoint vets the folder from its headers first; the model is then built on the meta device
        and filled by assignment, so the weights are never in memory twice. dtype=None keeps the stored dtype.
        """
        path, cfg, hf_config = check_checkpoint(path)
        with torch.device("meta"):
            model = cls(cfg, hf_config)
        sd = read_safetensors(path)
        sd.pop("lm_head.weight", None) if cfg.tie_word_embeddings else None  # some tied files store the copy
        for k in sd:
            sd[k] = sd[k].to(device=device, dtype=dtype or sd[k].dtype)
        model.load_state_dict(sd, strict=False, assign=True)
        if cfg.tie_word_embeddings:  # assignment replaced the embedding Parameter; re-tie
            model.lm_head.weight = model.model.embed_tokens.weight
        model.source_dir = os.path.abspath(path)
        return model

    def save_pretrained(self, path, max_shard_bytes=5 * 2**30, state_dict=None):
        """Write config.json + safetensors (sharded above max_shard_bytes) + the source's tokenizer files.

        Written into a temporary sibling folder and renamed into place, so a crash leaves no half checkpoint.
        state_dict: optional full state dict (e.g. gathered from FSDP2) to save instead of this module's.
        """
        sd = state_dict if state_dict is not None else self.state_dict()
        sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # tied checkpoints store only the embedding
        path = os.path.abspath(path)
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        hf = dict(self.hf_config) or to_hf_config(self.config)
        hf["dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
        hf.pop("torch_dtype", None)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        shards, size = [{}], 0
        for k in sorted(sd):
            n = sd[k].numel() * sd[k].element_size()
            if shards[-1] and size + n > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][k], size = sd[k], size + n
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
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        if self.source_dir and self.source_dir != path:
            for name in SIDE_FILES:
                src = os.path.join(self.source_dir, name)
                if os.path.isfile(src):
                    shutil.copy(src, tmp)
        old = path + ".old"  # swap: an existing checkpoint is moved aside only once the new one is whole
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def to_hf_config(cfg):
    """A config.json dict for a model built from a ModelConfig (not loaded from a checkpoint)."""
    only_in = {"attention_bias": ("qwen3", "llama"), "mlp_bias": ("llama",), "partial_rotary_factor": ("phi3",)}
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("rope_theta", "rope_scaling")  # below
         and cfg.model_type in only_in.get(f.name, SUPPORTED)}
    d.update(architectures=[ARCHITECTURES[cfg.model_type]], hidden_act="silu", rope_parameters=hf_rope_parameters(cfg),
             bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=True)  # Phi3Config's defaults: 32000
    if cfg.model_type == "phi3" and cfg.rope_scaling:  # Phi3Config reads this copy first (default 4096)
        d["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    return d


def resolve_checkpoint(path):
    """A local folder as is; a hub id ('org/name') downloaded to the local cache when online."""
    path = str(path)
    if os.path.isdir(path) or os.path.exists(path) or path.count("/") != 1 or path.startswith((".", "/")):
        return path
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise CheckpointError(f"{path!r} is not a local folder, and the hub is offline (HF_HUB_OFFLINE)")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"])
    except Exception as e:  # no network, unknown repo, gated repo
        raise CheckpointError(f"could not download {path!r} from the hub: {type(e).__name__}: {e}") from None


def check_checkpoint(path):
    """Fail fast, with a one-line CheckpointError, before any weight is read or an engine starts (vLLM would fail
    much later, in pages of tracebacks): config.json readable, of a supported model_type and features; every
    safetensors file present with a complete header (safe_open checks that it covers the file); the tensors the
    config implies, by name and shape. Reads headers only. Returns (folder, ModelConfig, config.json as a dict)."""
    path = resolve_checkpoint(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is not a checkpoint folder (no such directory)")
    try:
        with open(os.path.join(path, "config.json")) as f:
            hf_config = json.load(f)
        cfg = ModelConfig.from_hf(hf_config)
    except FileNotFoundError:
        raise CheckpointError(f"no config.json in {path!r}: not a Hugging Face checkpoint folder") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"unreadable config.json in {path!r}: {type(e).__name__}: {e}") from None
    found = read_safetensors(path, shapes_only=True)
    with torch.device("meta"):  # the names and shapes the config implies, from the model itself (no memory)
        expected = {k: tuple(t.shape) for k, t in Transformer(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:  # tied checkpoints store the embedding only (some store the copy anyway)
        expected.pop("lm_head.weight")
        found.pop("lm_head.weight", None)
    problems = {"missing": sorted(set(expected) - set(found)), "unexpected": sorted(set(found) - set(expected)),
                "mis-shaped": [f"{k} {found[k]} != {s}" for k, s in expected.items() if k in found and found[k] != s]}
    if any(problems.values()):
        raise CheckpointError(f"{path}: the weights do not match the {cfg.model_type} config.json: " + "; ".join(
            f"{what} {names[:4]}{'...' if len(names) > 4 else ''}" for what, names in problems.items() if names))
    return path, cfg, hf_config


def read_safetensors(path, shapes_only=False):
    """All tensors of a checkpoint folder, single-file or sharded, as {name: tensor} (CPU); with shapes_only,
    {name: shape} from the headers alone (a truncated file fails either way: safe_open checks the header)."""
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
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise CheckpointError(f"shard {name} listed in the index is missing from {path!r}")
        try:
            with safe_open(fp, framework="pt") as f:
                for k in f.keys():
                    sd[k] = tuple(f.get_slice(k).get_shape()) if shapes_only else f.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise CheckpointError(f"corrupt safetensors file {fp}: {e}") from None
    return sd


def checkpoints_in(out_dir):
    """distill.py's checkpoints in out_dir, oldest first (step_NNNNNNN folders, each complete: saves are renamed
    into place, so a half-written one never carries this name)."""
    if not os.path.isdir(out_dir):
        return []
    steps = sorted(d for d in os.listdir(out_dir) if d.startswith("step_") and d[5:].isdigit())
    return [os.path.join(out_dir, d) for d in steps]


def num_params(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
