"""
The torch sampler's decode at static shapes (sampler.py's decode='static' and 'graph'): every step's
shapes fixed by its batch and length buckets, so that a CUDA graph records each step once and
replays it.
"""
import torch

from kvcache import KVCache, StaticStep
from sampling import hash32, left_padded, sample_next, step_noise_key


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
