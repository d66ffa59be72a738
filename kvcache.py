"""
What a forward of model.py attends to: the positions and attention mask of a whole sequence (from
its padding), and the KV cache of batched decoding, which owns the positions and mask of every chunk
it takes, since only the cache knows which of its slots hold real tokens.

    cache = KVCache(model, batch_size, max_len)
    logits = model(prompt_ids, attention_mask=prompt_mask, cache=cache)  # prefill (B, T)
    logits = model(next_ids[:, None], cache=cache)                       # a decode step (B, 1)
    cache.select(alive)                                                  # drop finished rows

A cache is whatever has the four members model.py calls: inputs(attention_mask) -> (positions,
mask) before the blocks, append(layer, k, v) -> the keys and values to attend over in each block,
advance(attention_mask) after them, and rope_len. Two kinds:
- KVCache: shapes follow the cache's fill; a chunk attends to exactly the `len` slots written so
  far. Prefill chunks and decode steps alike.
- StaticStep, for CUDA graphs (static_decode.py's StaticDecoder): one token per row, written at a
  slot held in a device tensor, attending to a fixed window of slots, so that a step's shapes and
  tensor addresses never change.
"""

import copy

import torch


def sequence_inputs(attention_mask):
    """attention_mask (B, T) bool -> positions (B, T) and the attention mask of a whole sequence:
    None when no row is left-padded (training batches are right-padded), so that SDPA runs plain
    causal attention, exact for every real token and free to use its flash kernels (no T x T matrix
    at 16k tokens); else (B, 1, T, T)."""
    # position ids count real tokens only: a left-padded row gets the positions it would get alone
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return positions, None
    return positions, padding_mask(attention_mask, attention_mask.shape[1], offset=0)


def padding_mask(keys_valid, n_queries, offset):
    """(B, 1, T, S) bool: query i, at slot offset + i, attends to key slot j when j <= offset + i
    and the key is a real token (keys_valid (B, S)). A padded query attends to itself, so that no
    row is all -inf."""
    query_slot = torch.arange(n_queries, device=keys_valid.device)[:, None] + offset
    key_slot = torch.arange(keys_valid.shape[1], device=keys_valid.device)[None, :]
    mask = (key_slot <= query_slot)[None] & keys_valid[:, None, :]
    return (mask | (key_slot == query_slot)[None])[:, None]


class KVCache:
    """Preallocated keys and values for batched decoding: prefill once, then one token per row per
    step.

    Rows may have different lengths (left padding in the prefill): `valid` remembers which slots
    hold real tokens and `next_pos` each row's next position id, so a padded row decodes as it would
    alone. Every row writes its chunk at the same slots, `len` onwards; select() drops rows by
    copying the cache.
    """
    # the attention of a static step (model.py's Attention): not this cache's
    static = False

    def __init__(self, model, batch_size, max_len, dtype=None, device=None):
        config = model.config
        embedding = model.model.embed_tokens.weight
        dtype = dtype or embedding.dtype
        device = device or embedding.device
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        layers = range(config.num_hidden_layers)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        # slots written so far, the same for every row
        self.len = 0
        # picks LongRoPE's frequency set for all this cache holds (rope.Rope.cos_sin)
        self.rope_len = max_len

    def inputs(self, attention_mask):
        """The positions (B, T) and attention mask (B, 1, T, len + T) of the next chunk,
        attention_mask (B, T): it goes to slots len .. len + T - 1 and attends causally to the real
        tokens up to its own slot."""
        n_new = attention_mask.shape[1]
        self.valid[:, self.len:self.len + n_new] = attention_mask
        positions = attention_mask.long().cumsum(-1) - 1 + self.next_pos[:, None]
        mask = padding_mask(self.valid[:, :self.len + n_new], n_new, offset=self.len)
        return positions.clamp(min=0), mask

    def append(self, layer, k, v):
        """Write a chunk's keys and values (B, nkv, T, hs) at slots len onwards; returns all written
        so far."""
        end = self.len + k.shape[2]
        self.k[layer][:, :, self.len:end] = k
        self.v[layer][:, :, self.len:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, attention_mask):
        self.len += attention_mask.shape[1]
        self.next_pos += attention_mask.sum(-1)

    def select(self, rows):
        """Keep only these rows (e.g. drop finished samples); rows is a LongTensor of indices."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]
        self.valid = self.valid[rows]
        self.next_pos = self.next_pos[rows]

    def narrow(self, rows):
        """A cache over the first `rows` rows that shares this one's memory: its writes land
        here."""
        view = copy.copy(self)
        view.k = [t[:rows] for t in self.k]
        view.v = [t[:rows] for t in self.v]
        view.valid = self.valid[:rows]
        view.next_pos = self.next_pos[:rows]
        return view


class StaticStep:
    """A decode step at static shapes on the first `rows` rows of a KVCache, whose memory it shares:
    each row's token goes to `slot`, a 1-element device tensor, and attends to the first `window`
    slots with the unwritten ones masked. Shapes and addresses depend on (rows, window) only, and
    every counter a step reads is advanced in place on the device, so a CUDA graph recorded once
    replays every step of that shape."""
    static = True

    def __init__(self, cache, rows, window, slot):
        self.k = [t[:rows] for t in cache.k]
        self.v = [t[:rows] for t in cache.v]
        self.valid = cache.valid[:rows]
        self.next_pos = cache.next_pos[:rows]
        self.rope_len = cache.rope_len
        self.window = window
        self.slot = slot

    def inputs(self, attention_mask):
        """Marks `slot` written; returns the positions (B, 1) and the additive attention mask (B, 1,
        1, window). The mask is built once per step, not converted from bool in every layer."""
        if attention_mask.shape[1] != 1:
            raise ValueError("a static-shape cache step takes one token per row, "
                             f"got {attention_mask.shape[1]}")
        self.valid.index_fill_(1, self.slot, True)
        rows = self.valid.shape[0]
        mask = torch.zeros(rows, 1, 1, self.window, dtype=self.k[0].dtype, device=self.valid.device)
        mask.masked_fill_(~self.valid[:, None, None, :self.window], float("-inf"))
        return self.next_pos[:, None], mask

    def append(self, layer, k, v):
        # index_copy_ takes the slot as a tensor, so the step's slot is data, not a shape
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer][:, :, :self.window], self.v[layer][:, :, :self.window]

    def advance(self, attention_mask):
        # in place, so that the next replay of a recorded step reads the advanced values
        self.slot += 1
        self.next_pos += 1
