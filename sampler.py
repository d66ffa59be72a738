"""
The torch sampler, batched sampling with model.py's preallocated KV cache: a plain eager loop on a
CPU; on a GPU each decode step at static shapes, replayed as a CUDA graph (static_decode.py's
StaticDecoder). What both of rollout.py's backends share (the Sample type, argument checks, seeds,
stop ids, the sampling semantics) is sampling.py's. rollout.py's make_sampler() is the way in.

    sampler = TorchSampler("path/to/hf_dir")      # or TorchSampler(model=a_loaded_Transformer)
    out = sampler.generate([prompt_ids], n=4, temperature=1.0, max_new_tokens=256, seed=step,
                           logprobs=True)
    out[0][3].tokens, out[0][3].finish, out[0][3].logprobs    # prompt 0, sample 3 (a Sample)
"""
import os

import torch

from kvcache import KVCache
from model import Transformer
from sampling import (Sample, check_generate_args, checkpoint_stop_ids, dist_info, hash32,
                      left_padded, mix_seed, sample_next, sample_places, step_noise_key)
from static_decode import StaticDecoder, bucket, round_up


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
