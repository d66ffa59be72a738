"""
The torch sampler, batched sampling with model.py's preallocated KV cache (a plain eager loop on a
CPU; on a GPU each decode step at static shapes, replayed as a CUDA graph: StaticDecoder), and what
both of rollout.py's backends share (the Sample type, argument checks, seeds, stop ids).
rollout.py's make_sampler() is the way in.

    sampler = TorchSampler("path/to/hf_dir")      # or TorchSampler(model=a_loaded_Transformer)
    out = sampler.generate([prompt_ids], n=4, temperature=1.0, max_new_tokens=256, seed=step,
                           logprobs=True)
    out[0][3].tokens, out[0][3].finish, out[0][3].logprobs    # prompt 0, sample 3 (a Sample)

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

from kvcache import KVCache, StaticStep
from model import Transformer
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


class TorchSampler:
    """Batched sampling with model.py's KV cache. All samples are decoded together: each prompt is
    prefilled once (left-padded), its cache rows are copied n times, then one token per row per
    step. Sampling is exponential-race with hashed noise (sample_next), so nothing waits on the host
    per token. Two decode loops give the same samples (up to float rounding):
    - 'eager': shapes follow the batch; finished rows are dropped from the batch and the cache at a
      host sync every `sync_every` steps (every step on CPU, where a sync costs nothing; rows that
      finish in between run on and their extra tokens are cut). The CPU default.
    - 'static' / 'graph': StaticDecoder below, the step at static shapes; 'graph' records each step
      shape once as a CUDA graph and replays it. 'auto' = 'graph' on CUDA, else 'eager'.
    The static decoder (its cache and graphs) is kept between calls; sleep() frees it only when it
    takes more than gpu_memory_utilization of the device's memory (the sampler's share, as for
    vLLM).
    """

    def __init__(self, model_path=None, model=None, dtype=None, device=None, sync_every=None,
                 decode="auto", gpu_memory_utilization=None, n_tokens=None, dp_rank=None):
        if isinstance(dtype, str):
            # the vLLM spelling: 'auto', 'bfloat16', ...
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        if decode not in ("auto", "eager", "static", "graph"):
            raise ValueError(f"unknown decode {decode!r}: "
                             "expected 'auto', 'eager', 'static' or 'graph'")
        if model is None:
            if model_path is None:
                raise ValueError("the torch sampler needs model_path or model")
            device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            if dtype is None and device.type == "cuda":
                dtype = torch.bfloat16
            # dtype None: as stored
            model = Transformer.from_pretrained(model_path, dtype=dtype, device=device)
        elif any(hasattr(p, "full_tensor") for p in model.parameters()):
            raise ValueError("the torch sampler cannot share an FSDP-sharded model (every rank "
                             "would have to decode in lock-step): pass model_path and update it "
                             "with update_weights(fsdp_named_tensors(m))")
        self.model = model
        self.device = next(model.parameters()).device
        # the dtype update_weights receives: the trainer casts its shards to it before the gather
        self.dtype = next(model.parameters()).dtype
        # ids drawn: those of the tokenizer (n_tokens, its size), never the embedding's padding
        # rows past it. The logits are sliced before sampling (a view: nothing is copied)
        self.n_tokens = min(n_tokens or model.config.vocab_size, model.config.vocab_size)
        on_gpu = self.device.type == "cuda"
        if not on_gpu:
            # random and tiny models produce denormals, 10x slower on some CPUs
            torch.set_flush_denormal(True)
        if decode == "graph" and not on_gpu:
            raise ValueError(f"decode='graph' replays CUDA graphs: the model is on {self.device}, "
                             "not a CUDA device")
        if decode == "auto":
            decode = "graph" if on_gpu else "eager"
        self.decode = decode
        self.sync_every = sync_every or (16 if on_gpu else 1)
        # the StaticDecoder, kept between calls with its graphs
        self.static = None
        # vLLM's default share here
        self.keep_share = 0.3 if gpu_memory_utilization is None else gpu_memory_utilization
        self.stop_ids = checkpoint_stop_ids(model.source_dir, model.hf_config)
        # the data-parallel rank mixed into the seed: this process's, or a sampler rank's index
        # among the sampler ranks (distill.py's rollout_ranks)
        rank, self.dp_size = dist_info()
        self.dp_rank = rank if dp_rank is None else dp_rank

    @torch.inference_mode()
    def generate(self, prompts, n=1, temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=256,
                 stop_ids=None, seed=0, logprobs=False, places=None, on_sample=None):
        """prompts: lists of token ids. Returns [prompt][sample] -> Sample. places: see
        sample_places. on_sample(i, j, sample) is called once per sample as it is handed over (here:
        all together, at the end)."""
        check_generate_args(prompts, n, temperature, top_p, max_new_tokens)
        if not prompts:
            return []
        B = len(prompts) * n
        stop_list = self.stop_ids if stop_ids is None else list(stop_ids)
        stop = torch.tensor(stop_list, dtype=torch.long, device=self.device)
        # row = prompt index * n + sample index
        out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=self.device)
        out_lp = None
        if logprobs:
            out_lp = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=self.device)
        settings = (temperature, top_k, top_p, logprobs)
        key = mix_seed(seed, self.dp_rank if places is None else 0)
        place = sample_places(len(prompts), n, places)
        if self.decode == "eager":
            self._decode_eager(prompts, n, settings, max_new_tokens, stop, key, place, out, out_lp)
        else:
            self._decode_static(prompts, n, settings, max_new_tokens, stop, key, place, out, out_lp)
        # cut each row after its first stop token (later slots hold tokens of finished rows that ran
        # on, or nothing)
        is_stop = torch.isin(out, stop)
        ends = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, max_new_tokens).tolist()
        stopped = is_stop.any(1).tolist()
        tokens = out.tolist()
        lps = out_lp.tolist() if logprobs else None
        samples = []
        for r in range(B):
            finish = "stop" if stopped[r] else "length"
            row_lps = lps[r][:ends[r]] if logprobs else None
            samples.append(Sample(tokens[r][:ends[r]], finish, row_lps))
        if on_sample:
            for r, s in enumerate(samples):
                on_sample(r // n, r % n, s)
        return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _decode_eager(self, prompts, n, settings, max_new_tokens, stop, key, place, out, out_lp):
        model, dev = self.model, self.device
        temperature, top_k, top_p, logprobs = settings
        P, B = len(prompts), len(prompts) * n
        idx, mask = left_padded(prompts, dev)
        cache = KVCache(model, P, idx.shape[1] + max_new_tokens)
        # the last prompt token's logits (P, V)
        logits = model(idx, attention_mask=mask, cache=cache, last_only=True)[:, -1]
        if n > 1:
            # prefill each prompt once, then give each of its samples a copy of the cache row
            rows = torch.arange(P, device=dev).repeat_interleave(n)
            cache.select(rows)
            logits = logits[rows]
        # each row's key, from its place
        row_keys = hash32(key ^ hash32(torch.tensor(place, device=dev)))
        token_keys = hash32(torch.arange(self.n_tokens, device=dev))
        # the rows of `out` still in the batch
        alive = torch.arange(B, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for t in range(max_new_tokens):
            step_key = step_noise_key(key, t)
            tok = sample_next(logits[:, :self.n_tokens], temperature, top_k, top_p,
                              row_keys[alive], step_key, token_keys)
            out[alive, t] = tok
            if logprobs:
                # log p = logit - logsumexp: no (B, V) log-softmax written
                chosen = logits.float().gather(-1, tok[:, None])[:, 0]
                out_lp[alive, t] = chosen - logits.float().logsumexp(-1)
            done[alive] |= torch.isin(tok, stop)
            if t == max_new_tokens - 1:
                break
            if (t + 1) % self.sync_every == 0:
                # the one host sync: drop finished rows
                keep = (~done[alive]).nonzero()[:, 0]
                if len(keep) == 0:
                    break
                if len(keep) < len(alive):
                    alive = alive[keep]
                    tok = tok[keep]
                    cache.select(keep)
            logits = model(tok[:, None], cache=cache)[:, -1]

    def _decode_static(self, prompts, n, settings, max_new_tokens, stop, key, place, out, out_lp):
        B = len(prompts) * n
        T = max(len(p) for p in prompts)
        # the cache holds the longest row this call can make (its longest prompt + max_new_tokens),
        # not the model's whole context; a decoder from an earlier call is kept (graphs and all)
        # when it is large enough
        max_len = round_up(T + max_new_tokens, StaticDecoder.LEN_BUCKET)
        want = min(bucket(B), StaticDecoder.MAX_ROWS)
        if self.static is None or self.static.max_len < max_len or self.static.wanted < want:
            # free the old one first: what memory allows is measured without it
            self.static = None
            self.static = StaticDecoder(self.model, want, max_len, self.n_tokens,
                                        graphs=self.decode == "graph")
        decoder = self.static
        decoder.start(settings, stop, key, place)
        # more rows than fit: in turns (a row's samples do not depend on it)
        for lo in range(0, B, decoder.rows):
            hi = min(B, lo + decoder.rows)
            decoder.decode(prompts, n, lo, hi, max_new_tokens, self.sync_every, out, out_lp)

    @torch.no_grad()
    def update_weights(self, named_tensors):
        """Copy (HF name, tensor) pairs into the model; a tensor that already is the parameter is
        skipped."""
        params = dict(self.model.named_parameters())
        tied = self.model.config.tie_word_embeddings
        for name, t in named_tensors:
            if tied and name == "lm_head.weight":
                continue
            if name not in params:
                raise KeyError(f"update_weights: no parameter {name!r} in the sampler's model")
            p = params[name]
            if p.data_ptr() != t.data_ptr():
                p.copy_(t)

    def sleep(self):
        """Free the static decoder for the trainer if it takes more than our share of the device's
        memory; a smaller one is kept, so the next generate() replays its CUDA graphs instead of
        recording them again (a recording costs an eager step and a capture per step shape, at
        every training step)."""
        share = self.keep_share * device_memory(self.device)
        if self.static is not None and self.static.nbytes() > share:
            self.static = None

    def wake(self):
        # sleep() frees nothing that must come back
        pass

    def close(self):
        self.static = None


def device_memory(device):
    """Total memory of a device in bytes: the GPU's, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bucket(n):
    """The batch bucket of n rows: the next power of two."""
    return 1 << (n - 1).bit_length()


def round_up(n, m):
    return -(-n // m) * m


class StaticDecoder:
    """The torch sampler's decode loop at static shapes, so that a CUDA graph can record each step
    once and replay it (decode='graph'; decode='static' runs the same code without graphs, on any
    device).

    Eager decoding on a GPU costs ~20 ms a step whatever the batch: a 1.5B model's step is ~1,200
    small kernels launched one by one from Python, and dropping finished rows copies the whole
    cache. Here:
    - a step's shapes depend only on its batch bucket (1, 2, 4, ... rows: padded with dead rows) and
      its length bucket (attention reads the first LEN_BUCKET * k cache slots, the unwritten ones
      masked), so one graph per (batch, length, sampling settings) replays every step of that
      shape: one launch instead of ~1,200;
    - all a step reads or writes lives in buffers allocated once here (cache, each row's last token,
      step and slot counters, outputs, done flags), so the addresses baked into the graphs never
      change: they stay valid across generate() calls, sleep() and in-place weight updates
      (update_weights);
    - sampling (the hashed exponential race), stop detection and the output writes run inside the
      graph; the host syncs only every sync_every steps, to read the done flags;
    - finished rows leave by re-bucketing: once the live rows fit a smaller batch bucket they are
      gathered to the front (one copy of their cache) and the smaller graphs take over; until then
      they ride along;
    - the prefill stays eager: one forward per PREFILL_CHUNK prompt tokens.
    Graphs are recorded and replayed on the model's device, which need not be the current one.
    """
    # attention windows are multiples of this many slots
    LEN_BUCKET = 256
    # rows decoded at once (more are decoded in turns), fewer if memory is short
    MAX_ROWS = 256
    # prompt tokens per prefill forward: bounds its (rows, chunk, cache) attention mask
    PREFILL_CHUNK = 2048

    def __init__(self, model, rows, max_len, n_tokens, graphs):
        dev = next(model.parameters()).device
        self.model = model
        # ids at or past n_tokens (an embedding's padding rows) are never drawn
        self.n_tokens = n_tokens
        self.device = dev
        self.max_len = max_len
        self.graphs = graphs
        self.wanted = rows
        self.rows = self.rows_that_fit(model, rows, max_len)
        R = self.rows
        V = model.config.vocab_size
        self.cache = KVCache(model, R, max_len)
        # the cache slot every row writes its next token to
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        # each row's last token: the next step's input
        self.tok = torch.zeros(R, dtype=torch.long, device=dev)
        # noise key of each row
        self.row_keys = torch.zeros(R, dtype=torch.long, device=dev)
        # stopped (or a dead padding row)
        self.done = torch.zeros(R, dtype=torch.bool, device=dev)
        # tokens, by batch slot
        self.out = torch.zeros(R, max_len, dtype=torch.long, device=dev)
        # their log-probs, when asked
        self.lp = torch.zeros(R, max_len, dtype=torch.float32, device=dev)
        # decode step: the column of `out` written next
        self.t = torch.zeros(1, dtype=torch.long, device=dev)
        # mix_seed(seed, rank)
        self.key = torch.zeros(1, dtype=torch.long, device=dev)
        self.token_keys = hash32(torch.arange(n_tokens, device=dev))
        # a lookup table: isin() may sync the host
        self.is_stop = torch.zeros(V, dtype=torch.bool, device=dev)
        # (rows, window, settings) -> torch.cuda.CUDAGraph
        self.recorded = {}
        # one memory pool for all graphs, which never run at once and keep nothing in it between
        # replays; captures into one pool share one stream (made at the first capture)
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.capture_stream = None

    def nbytes(self):
        """Memory of the buffers: the cache and the outputs dominate (the graphs' pool holds one
        step's temporaries, not counted)."""
        c = self.cache
        return sum(t.numel() * t.element_size() for t in c.k + c.v + [c.valid, self.out, self.lp])

    @staticmethod
    def rows_that_fit(model, rows, max_len):
        """rows, or the largest power of two below it whose cache (and per-row sampling buffers) fit
        in 80% of the free GPU memory."""
        dev = next(model.parameters()).device
        if dev.type != "cuda":
            return rows
        c = model.config
        elt = model.model.embed_tokens.weight.element_size()
        # keys and values of every layer, then a valid flag, a token and a log-prob per slot
        kv_bytes_per_slot = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elt
        per_row = (kv_bytes_per_slot + 13) * max_len
        # logits, probabilities, noise: a few (V,) fp32/int64 copies per row
        per_row += 32 * c.vocab_size
        free = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev)
        free -= torch.cuda.memory_allocated(dev)
        fit = int(0.8 * free) // per_row
        if fit < 1:
            raise RuntimeError(f"not enough GPU memory for the KV cache of one {max_len}-token row "
                               f"({per_row / 2**20:.0f} MiB; {free / 2**20:.0f} MiB free)")
        return min(rows, 1 << (fit.bit_length() - 1))

    def start(self, settings, stop, key, place):
        """A generate() call's (temperature, top_k, top_p, logprobs), stop ids, noise key and row
        places."""
        self.settings = settings
        self.place = place
        self.is_stop.zero_()
        # ids beyond the vocabulary can never be sampled
        self.is_stop[stop[stop < len(self.is_stop)]] = True
        self.key.fill_(key)

    def decode(self, prompts, n, lo, hi, max_new_tokens, sync_every, out, out_lp):
        """Rows lo..hi-1 of the batch (row = prompt index * n + sample index), written into out /
        out_lp."""
        c = self.cache
        R = hi - lo
        first = lo // n
        logits, T = self.prefill(prompts[first:(hi - 1) // n + 1])
        # each row's prompt among those prefilled
        src = torch.arange(lo, hi, device=self.device) // n - first
        if n > 1:
            # each sample of a prompt gets a copy of its prompt's cache row
            for buf in c.k + c.v:
                buf[:R, :, :T] = buf[src, :, :T]
            c.valid[:R] = c.valid[src]
            c.next_pos[:R] = c.next_pos[src]
            logits = logits[src]
        places = torch.tensor(self.place[lo:hi], device=self.device)
        self.row_keys[:R] = hash32(self.key ^ hash32(places))
        B = bucket(R)
        self.done.zero_()
        # padding rows: attend only to their own new keys, never counted as live
        self.done[R:B] = True
        self.t.zero_()
        self.slot.fill_(T)
        # token 0, from the prefill
        self.sample(logits)
        # batch slot -> row of `out`; -1: padding or retired
        live = list(range(lo, hi)) + [-1] * (B - R)
        for t in range(1, max_new_tokens):
            if t % sync_every == 0:
                # the one host sync
                B = self.retire(live, B, T + t - 1, out, out_lp)
                if B == 0:
                    return
            # this step writes token t-1 at slot T+t-1 and attends to slots 0..T+t-1
            self.step(B, min(self.max_len, round_up(T + t, self.LEN_BUCKET)))
        self.write_back(live, out, out_lp)

    def prefill(self, prompts):
        """Left-padded prefill of the first len(prompts) rows (eager); returns their last logits (P,
        V) and the padded prompt length T: every row's next token goes to slot T."""
        idx, mask = left_padded(prompts, self.device)
        # forget the previous batch: its keys stay in the cache, masked
        self.cache.valid.zero_()
        self.cache.next_pos.zero_()
        # eager steps, on the first P rows of the buffers
        cache = self.cache.narrow(len(prompts))
        for i in range(0, idx.shape[1], self.PREFILL_CHUNK):
            chunk = slice(i, i + self.PREFILL_CHUNK)
            logits = self.model(idx[:, chunk], attention_mask=mask[:, chunk], cache=cache,
                                last_only=True)
        return logits[:, -1], idx.shape[1]

    def sample(self, logits):
        """Each row's next token from its (B, V) logits, recorded at step t; then t += 1. No host
        sync."""
        B = logits.shape[0]
        # no copy in fp32
        logits = logits.float()
        temperature, top_k, top_p, logprobs = self.settings
        step_key = step_noise_key(self.key, self.t)
        tok = sample_next(logits[:, :self.n_tokens], temperature, top_k, top_p, self.row_keys[:B],
                          step_key, self.token_keys)
        self.tok[:B] = tok
        # the step as a tensor: a graph replays it unchanged
        self.out[:B].index_copy_(1, self.t, tok[:, None])
        if logprobs:
            chosen = logits.gather(-1, tok[:, None]) - logits.logsumexp(-1, True)
            self.lp[:B].index_copy_(1, self.t, chosen)
        self.done[:B].logical_or_(self.is_stop[tok])
        self.t += 1

    def forward_and_sample(self, B, W):
        """One decode step of the first B rows, attention over W slots: what a CUDA graph
        records."""
        step = StaticStep(self.cache, B, W, self.slot)
        self.sample(self.model(self.tok[:B, None], cache=step)[:, -1])

    def step(self, B, W):
        if not self.graphs:
            return self.forward_and_sample(B, W)
        key = (B, W, self.settings)
        # CUDA's stream and graph calls act on the current device, which need not be the model's (a
        # rank on cuda:LOCAL_RANK before any set_device): captured there, a graph would hold none of
        # the model's kernels and replay nothing. So every one is made on the model's device.
        with torch.cuda.device(self.device):
            if key in self.recorded:
                return self.recorded[key].replay()
            # first step of this shape: run it eagerly on the capture stream, which also warms up
            # what must not first happen during capture (cuBLAS handles and workspaces, lazy kernel
            # loading), then record it. Recording runs nothing, so the step is done once; the graph
            # replays it from the next step of this shape on.
            if self.capture_stream is None:
                self.capture_stream = torch.cuda.Stream(device=self.device)
            current = torch.cuda.current_stream(self.device)
            self.capture_stream.wait_stream(current)
            with torch.cuda.stream(self.capture_stream):
                self.forward_and_sample(B, W)
            current.wait_stream(self.capture_stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.capture_stream):
                self.forward_and_sample(B, W)
            self.recorded[key] = graph

    def retire(self, live, B, S, out, out_lp):
        """At a host sync: once the live rows fit a smaller batch bucket, write every row's tokens
        back and gather the live rows to the front (their first S cache slots); returns the batch
        bucket, 0 when none is live. `live` is updated in place."""
        done = self.done[:B].tolist()
        keep = [i for i in range(B) if live[i] >= 0 and not done[i]]
        new_bucket = bucket(len(keep)) if keep else 0
        if new_bucket == B:
            # finished rows ride along until the bucket can shrink; their extra tokens are cut
            return B
        self.write_back(live, out, out_lp)
        if not keep:
            return 0
        k = len(keep)
        idx = torch.tensor(keep, device=self.device)
        c = self.cache
        for buf in c.k + c.v:
            buf[:k, :, :S] = buf[idx, :, :S]
        for buf in (c.valid, c.next_pos, self.tok, self.row_keys, self.out, self.lp):
            buf[:k] = buf[idx]
        self.done[:k] = False
        self.done[k:new_bucket] = True
        live[:] = [live[i] for i in keep] + [-1] * (new_bucket - k)
        return new_bucket

    def write_back(self, live, out, out_lp):
        """Copy the tokens (and log-probs) of the rows in the batch to their rows of out /
        out_lp."""
        slots = [i for i, r in enumerate(live) if r >= 0]
        rows = [live[i] for i in slots]
        out[rows] = self.out[slots, :out.shape[1]]
        if out_lp is not None:
            out_lp[rows] = self.lp[slots, :out.shape[1]]
