"""
Rotary position embeddings, as the checkpoints model.py loads define them in config.json: plain RoPE
(Qwen, SmolLM2), Llama 3's frequency scaling (rope_type "llama3"), Phi-3/Phi-4's LongRoPE
("longrope"), and partial rotation (Phi: only the first partial_rotary_factor of each head's
dimensions turn; the rest pass through).

    # read_rope raises a ValueError that names what is not implemented
    theta, partial, scaling = read_rope(config_json, head_dim)
    rope = Rope(model_config)
    cos, sin = rope.cos_sin(pos, seq_len, dtype)  # pos (B, T) -> (B, T, rotary dims) each
    q = apply_rope(q, cos, sin)                   # q (B, nh, T, head_dim), rotate-half convention
"""

import math

import torch

ROPE_TYPES = ("default", "llama3", "longrope")
SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings"),
                "longrope": ("short_factor", "long_factor", "original_max_position_embeddings")}
# longrope: derived from the context lengths when absent
OPTIONAL_KEYS = ("factor", "attention_factor")


def read_rope(d, head_dim):
    """(rope_theta, partial_rotary_factor, scaling) from a config.json dict, in either spelling:
    transformers 5 writes rope_parameters = {rope_type, rope_theta, partial_rotary_factor, <scaling
    keys>}; older files write rope_theta and partial_rotary_factor at the top level and rope_scaling
    = {type or rope_type, <scaling keys>} (or null). scaling: None for plain RoPE, else {rope_type,
    <the keys that type needs>}."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not implemented "
                         f"(rope.py implements {ROPE_TYPES})")
    theta = rope.get("rope_theta", d.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json has neither rope_theta nor rope_parameters.rope_theta")
    partial = float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor")) or 1.0)
    # the other families' transformers code turns whole heads
    if partial != 1.0 and d.get("model_type") != "phi3":
        raise ValueError(f"partial_rotary_factor={partial} in config.json "
                         "is implemented for phi3 only")
    if rope_type == "default":
        return float(theta), partial, None
    # the pretraining context: Phi-3 files keep it at the top level, and transformers lets that
    # copy win
    omax = d.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    omax = omax or d["max_position_embeddings"]
    scaling = dict(rope, rope_type=rope_type, original_max_position_embeddings=omax)
    missing = [k for k in SCALING_KEYS[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_type={rope_type!r} needs {missing} in config.json")
    # one factor per rotated pair of dimensions
    half = int(head_dim * partial) // 2
    factor_lens = (len(scaling.get("short_factor", ())), len(scaling.get("long_factor", ())))
    if rope_type == "longrope" and factor_lens != (half, half):
        raise ValueError(f"longrope short_factor / long_factor need {half} entries each "
                         "(rotated dimensions / 2), "
                         f"got {factor_lens[0]} / {factor_lens[1]}")
    keep = SCALING_KEYS[rope_type] + (OPTIONAL_KEYS if rope_type == "longrope" else ())
    kept = {k: scaling[k] for k in keep if k in scaling}
    return float(theta), partial, {"rope_type": rope_type, **kept}


def llama3_inv_freq(inv_freq, s):
    """Llama 3.1's scaling: wavelengths longer than the pretraining context / low_freq_factor are
    stretched by `factor`, those shorter than context / high_freq_factor kept, the band between
    interpolated smoothly."""
    context = s["original_max_position_embeddings"]
    low = s["low_freq_factor"]
    high = s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / s["factor"], inv_freq)
    # 0 at the low-frequency edge, 1 at the high one
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    between = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(between, blended, scaled)


class Rope:
    """The inverse frequencies of one model; cos_sin turns positions into the cos and sin that
    rotate q and k.

    Not an nn.Module: nothing here is a weight or is saved, and model.py builds models on the meta
    device, so the frequencies are computed on the CPU (in fp32, as transformers does) and copied to
    each device once.

    LongRoPE has two frequency sets, `short_factor` for sequences up to
    original_max_position_embeddings and `long_factor` beyond, and scales cos and sin by its
    attention factor (on the rotated dimensions only). Which set a forward uses is chosen by
    `seq_len` (see cos_sin), once per sequence, never per position.
    """

    def __init__(self, cfg):
        # rotated dimensions of each head
        self.dim = int(cfg.head_dim * cfg.partial_rotary_factor)
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float() / self.dim
        s = cfg.rope_scaling or {"rope_type": "default"}
        # LongRoPE only: the long set is used above `switch`, and cos and sin are scaled
        self.switch = None
        self.scale = 1.0
        if s["rope_type"] == "longrope":
            sets = [torch.tensor(s[k], dtype=torch.float32, device="cpu")
                    for k in ("short_factor", "long_factor")]
            self.inv_freq = torch.stack([1.0 / (f * cfg.rope_theta ** exponent) for f in sets])
            self.switch = omax = s["original_max_position_embeddings"]
            factor = s.get("factor") or cfg.max_position_embeddings / omax
            # LongRoPE's attention factor: sqrt(1 + ln(extension) / ln(pretraining context)),
            # unless given
            derived = math.sqrt(1 + math.log(factor) / math.log(omax)) if factor > 1 else 1.0
            self.scale = s.get("attention_factor") or derived
        else:
            inv_freq = 1.0 / (cfg.rope_theta ** exponent)
            if s["rope_type"] == "llama3":
                inv_freq = llama3_inv_freq(inv_freq, s)
            self.inv_freq = inv_freq[None]
        # device -> inv_freq there: copied at its first (eager) forward, never inside a CUDA graph
        self.on_device = {}

    def cos_sin(self, pos, seq_len, dtype):
        """pos (B, T) integer positions -> cos, sin (B, T, dim), computed in fp32, then cast to
        dtype.

        seq_len picks LongRoPE's set: long when it exceeds original_max_position_embeddings.
        - A full forward passes each row's own length, (B,). Transformers switches on the longest
        row of the
          whole batch: the two agree on every batch whose rows lie on one side, and here a row does
          not depend on its batch (a padded batch equals its rows alone).
        - Incremental decoding passes the KV cache's capacity (an int), so one set serves everything
        the cache
          holds: vLLM's behaviour (one set per engine, long iff max_model_len exceeds the switch),
          not transformers'. Transformers switches sets in mid-decode when a sequence crosses the
          switch while its cached keys keep the short rotation, so the steps after it equal no full
          forward of any sequence. A fixed set never mixes rotations: a step equals the full forward
          whenever its sequence lies on the side the capacity chose, and the torch sampler and vLLM,
          told the same maximum length, decode alike.
        """
        inv = self.on_device.get(pos.device)
        if inv is None:
            inv = self.on_device[pos.device] = self.inv_freq.to(pos.device)
        if self.switch is None:
            freq = inv[0]
        elif isinstance(seq_len, int):
            freq = inv[int(seq_len > self.switch)]
        else:
            # (B, 1, dim/2): each row its set
            freq = inv[(seq_len > self.switch).long()][:, None]
        freqs = pos.float()[..., None] * freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        # LongRoPE's attention factor (a multiply by 1 would be one operation more per decode step)
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs); rotate-half convention, as in the HF checkpoints (no q/k permutation
    needed). With partial rotation (cos narrower than the head) the dimensions past cos's width pass
    through."""
    d = cos.shape[-1]
    if d < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :d], cos, sin), x[..., d:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


def hf_rope_parameters(cfg):
    """config.json's rope_parameters (transformers 5 spelling) for a model.py ModelConfig."""
    params = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    if cfg.partial_rotary_factor != 1.0:
        params["partial_rotary_factor"] = cfg.partial_rotary_factor
    return params
