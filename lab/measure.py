"""
What the bench's sections share: a timer, models of a given shape with random weights, and the FLOP
count behind MFU and the floors. lab/bench.py and lab/peer.py import it; it imports neither.
"""
import time

import torch

from model import ModelConfig, Transformer, to_hf_config

CPU = torch.device("cpu")

def best_time(fn, repeats, device):
    """Best wall time of `repeats` calls of fn(), after one call as a warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times[1:])

# ------------------------------------------------------------------------ models of a given shape
# the paper's student and teacher (DeepSeek-R1-Distill-Qwen-1.5B, JustRL-DeepSeek-1.5B): the
# Qwen2.5-1.5B shape
QWEN_1P5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                 rope_theta=10000.0)
TINY_QWEN3 = dict(model_type="qwen3", vocab_size=4096, hidden_size=256, intermediate_size=768,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  max_position_embeddings=1024)

def random_model(shape, device, dtype=torch.float32, seed=0):
    """model.py's Transformer of this shape with random weights (matrices normal with std 0.02,
    norms 1, biases 0), built directly on `device`: no checkpoint is written or read."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(ModelConfig(**shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.zero_()
    return model.to(dtype)

def hf_copy(model):
    """transformers' model of the same architecture holding the same weights (the names are Hugging
    Face's)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = to_hf_config(model.config)
    p = next(model.parameters())
    with torch.device(p.device):
        hf_config = AutoConfig.for_model(d.pop("model_type"), **d)
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=p.dtype)
    hf.load_state_dict(model.state_dict())
    return hf.eval()

def describe(s):
    return (f"{s['model_type']}, d={s['hidden_size']}, {s['num_hidden_layers']} layers, "
            f"V={s['vocab_size']:,}")

# -------------------------------------------------------------------------- FLOP count (for MFU)
def forward_flops(c, sequences, T, blocks, head_rows):
    """FLOPs of one forward of `sequences` x T tokens through the first `blocks` blocks, and the LM
    head on head_rows:
        blocks * (2 * block_weights * tokens  +  4 * nh*hs * pairs)  +  2 * d * V * head_rows
    block_weights: q, k, v, o, gate, up, down; pairs = sequences * T(T+1)/2, the causal (query, key)
    pairs, for which QK^T and AV cost 2 x 2 x nh*hs FLOPs (= 4 * T^2 * d / 2 per layer when
    nh*hs = d). Norms, softmax: not counted."""
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    d = c.hidden_size
    block_weights = d * (q + 2 * kv) + q * d + 3 * d * c.intermediate_size
    attention = 4 * q * sequences * T * (T + 1) // 2
    return (blocks * (2 * block_weights * sequences * T + attention)
            + 2 * d * c.vocab_size * head_rows)

def update_flops(plan, c_s, c_t, sequences, T, head_rows, checkpointing):
    """FLOPs of one update as distill.py computes it (both forwards, the loss, backward):
        model    = teacher forward (up to its deepest tap; LM head only if the loss needs logits)
                 + 3 x student forward (forward, and backward = 2 x forward)
        hardware = model + the student's blocks again (activation checkpointing recomputes them in
                   backward)
                 + both LM heads again (each vocabulary chunk is recomputed in backward, the
                   teacher's too; not under opd_full, whose gradient is made in the forward pass:
                   losses.FullKL)
    MFU = model / seconds / peak; HFU = hardware / seconds / peak."""
    rows = head_rows if plan.out_kind else 0
    t_blocks = min(plan.t_taps[-1], plan.L_t)
    s_blocks = min(plan.s_taps[-1], plan.L_s)
    model = (forward_flops(c_t, sequences, T, t_blocks, rows)
             + 3 * forward_flops(c_s, sequences, T, s_blocks, rows))
    again = 0 if plan.out_kind == 'opd_full' else rows
    head_weights = c_s.hidden_size * c_s.vocab_size + c_t.hidden_size * c_t.vocab_size
    hardware = model + 2 * again * head_weights
    return model, hardware + (forward_flops(c_s, sequences, T, s_blocks, 0) if checkpointing else 0)

def body_to_head(shape, T=1):
    """Per-token FLOPs of all blocks over those of the LM head in a sequence of T tokens: at T = 1
    the ratio of their weights (and one attention pair); above, the blocks' causal attention grows
    with T."""
    c = ModelConfig(**shape)
    return forward_flops(c, 1, T, c.num_hidden_layers, 0) / forward_flops(c, 1, T, 0, T)
