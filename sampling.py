"""
What both of rollout.py's backends share: the Sample type, the argument checks, the stop ids, the
seeds, and the torch backend's sampling without a host sync (hashed exponential noise), which its
eager decode (sampler.py) and its static-shape decode (static_decode.py) both run.

Sampling semantics (both backends; rollout.py's vLLM sampler follows them too):
- processing order as in vLLM: temperature, then top-k, then top-p (top_k <= 0, top_p = 1: off);
  0 = greedy.
- a sample stops at the first token in stop_ids, which is kept as its last token (finish='stop'),
  else it ends at max_new_tokens (finish='length'). stop_ids=None: the checkpoint's
  eos_token_id(s); pass a tokenizer's eos_ids to stop at the chat template's end of turn as well.
- logprobs are the model's raw log-probabilities of the chosen tokens: log-softmax of the
  unprocessed logits (temperature 1, before top-k/top-p), vLLM's "raw_logprobs" mode. Losses
  recompute them with the training model anyway (the sampler's numerics differ, in bf16 above
  all); these are for logging and checks.
- seeds: one seed gives the same samples. Under torchrun the seed is combined with the
  data-parallel rank, so ranks draw independent samples; use a new seed per step. The torch
  backend draws its noise from a hash of (seed, row, step, token): a sample does not depend on the
  other rows of the batch, on when they finish or on the batch size, only on its prompt, its place
  (sample_places) and the seed, up to float rounding (other batch shapes change the last bits of
  the logits: only near-ties notice). vLLM seeds each request from the same (seed, rank, place):
  reproducible too, though its samples are not the torch backend's.
"""
import os
from dataclasses import dataclass

import torch

from tokenizer import read_json

# ------------------------------------------------------------------ shared by both backends


@dataclass
class Sample:
    # response token ids; with finish='stop' the last one is the stop token
    tokens: list
    # 'stop' | 'length'
    finish: str
    # raw log-probability of each token (see the top of the file)
    logprobs: list | None = None


def check_generate_args(prompts, n, temperature, top_p, max_new_tokens):
    """The arguments both backends' generate() refuse, with the reason."""
    if n < 1:
        raise ValueError(f"n={n}: generate() draws n >= 1 samples per prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: a sample has at least one new token")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    if not (0 < top_p <= 1 and temperature >= 0):
        raise ValueError(f"need 0 < top_p <= 1 and temperature >= 0, "
                         f"got top_p={top_p}, temperature={temperature}")


def dist_info():
    """(rank, world_size) of torch.distributed, or from torchrun's environment before it is
    initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def checkpoint_stop_ids(path=None, hf_config=None):
    """eos_token_id(s) of a checkpoint: config.json and generation_config.json, merged."""
    found = []
    sources = [hf_config or {}]
    for name in ("config.json", "generation_config.json"):
        if path and os.path.isfile(os.path.join(path, name)):
            sources.append(read_json(os.path.join(path, name)))
    for d in sources:
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            found += eos
        elif eos is not None:
            found.append(eos)
    return sorted(set(found))


# ------------------------------------------------------------------ sampling without a host sync

M32 = 0xFFFFFFFF


def hash32(x):
    """A well-mixed 32-bit integer hash of a python int or of an int64 tensor (in place; the
    products stay below 2**63), the same values for both. The sampling hot loop is a pass per op
    over (B, V)."""
    for _ in range(2):
        x ^= x >> 16
        x *= 0x45D9F3B
        x &= M32
    x ^= x >> 16
    return x


def mix_seed(seed, rank):
    """A 32-bit key from the user's seed and the data-parallel rank."""
    return hash32(hash32(seed & M32) ^ rank)


def process_logits(logits, temperature, top_k=-1, top_p=1.0):
    """(B, V) raw logits -> the logits of the sampling distribution: / temperature, then top-k, then
    top-p (vLLM's order); excluded tokens get -inf. temperature > 0 (0 = greedy is the caller's
    business)."""
    # no copy if already fp32
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # the nucleus is every token at least as likely as its least likely member: find that cutoff
        # from the sorted probabilities
        probs = logits.softmax(-1)
        desc = probs.sort(-1).values.flip(-1)
        # probability of the tokens ranked above each one
        mass_above = desc.cumsum(-1) - desc
        # the smallest top set that reaches top_p
        n_keep = (mass_above < top_p).sum(-1, keepdim=True).clamp(min=1)
        logits = logits.masked_fill(probs < desc.gather(-1, n_keep - 1), float("-inf"))
    return logits


def exponential_noise(row_keys, step_key, token_keys):
    """Exp(1) draws (B, V), one per (row, step, token), from a counter-based hash of (token key ^
    row key) + step key: no generator state, so what a row draws depends on its key and the step
    only, never on the batch's other rows. step_key: an int or a 1-element tensor."""
    keys = (token_keys[None, :] ^ row_keys[:, None]).add_(step_key).bitwise_and_(M32)
    # uniform in (0, 1]; fine steps near 0 keep tiny probabilities samplable
    u = hash32(keys).float().add_(0.5).mul_(2.0**-32)
    # -log(1 - u)
    return u.neg_().log1p_().neg_()


def sample_next(logits, temperature, top_k, top_p, row_keys, step_key, token_keys):
    """(B, V) raw logits -> (B,) next tokens, without a host sync: argmax at temperature 0, else the
    exponential race (argmax p / E, E ~ Exp(1)), which picks v with probability p_v, on hashed
    noise. step_key: an int, or a 1-element tensor (inside a CUDA graph the step counter lives on
    the device)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = process_logits(logits, temperature, top_k, top_p).softmax(-1)
    return probs.div_(exponential_noise(row_keys, step_key, token_keys)).argmax(-1)


def sample_places(n_prompts, n, places=None):
    """Each sample's place, its noise key's input: prompt index * n + sample index (the key mixes in
    the rank); with places (each prompt's index in a whole set: eval.py), places[i] * n + j and no
    rank, whatever the split."""
    if places is None:
        places = range(n_prompts)
    return [places[i] * n + j for i in range(n_prompts) for j in range(n)]


def step_noise_key(key, t):
    """The noise key of decode step t (an int, or a tensor hashed elementwise to the same
    values)."""
    return hash32(key ^ hash32(t + 2**31))


def left_padded(prompts, device):
    """Token ids (P, T) and attention mask (P, T) of prompts, left-padded: every row's next token
    goes to the same slot."""
    T = max(len(p) for p in prompts)
    idx = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = True
    return idx.to(device), mask.to(device)
