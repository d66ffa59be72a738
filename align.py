"""
Distillation across tokenizers (METHOD.md §4b). Each rollout reaches the teacher as the teacher's
own encoding of the same conversation: the prompt through its chat template, the student's response
text re-encoded by its tokenizer and closed by its end-of-turn token when the student stopped (a
truncated response gets no end). The two models are compared only where both have read exactly the
same bytes of the response: a chunk closes where both tokenizations reach the same byte offset (TRL
GOLD's grouping rule) and the pair supervised is the last token of each chunk on both sides. With
identical tokenizers every chunk is one token and nothing changes.

    # once, before any work: ValueError naming what cannot work
    check_tokenizers(student_tok, teacher_tok)
    view = align_rollout(student_tok, teacher_tok, messages, response_ids,
                         finished=(finish == 'stop'))
    view.prompt_ids, view.response_ids      # what the teacher reads
    view.pairs                              # (C, 2) response positions (student, teacher) compared
    # chunk-level sampled-token OPD on those chunks:
    #   losses.chunk_opd_loss(lp_s, lp_t, view.s_spans, view.t_spans)

Bytes, not characters: a token may hold part of a multi-byte character (byte-level BPE, the byte
tokenizer), so every offset here counts UTF-8 bytes, from a table of each token id's bytes built
once per tokenizer. A stop token counts as one byte past the text, whatever its spelling: both
models' ends of turn close the last chunk together.

A rollout is the model's output, so nothing in it stops a run. The text both models read ends
before the first of: a byte that is not UTF-8, an id the student's tokenizer does not have (an
embedding's padding row: spelled as such a byte), a stop token inside the response, and the first
byte the teacher's tokenizer reads back differently (a normaliser: NFC composes accents). The
teacher reads special-token text as text (encode_text), as the student wrote it. A view with no
chunk is not aligned (view.aligned); distill.py leaves it out of the step and counts it.
"""
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from tokenizer import PROBE_TEXTS

WHITESPACE = np.frombuffer(b" \t\n\r\x0b\x0c", np.uint8)
# how an id outside the tokenizer is spelled: one byte that is never UTF-8
NOT_TEXT = b"\xff"


# --------------------------------------------------------------------------- what each token spells

def _byte_level_alphabet():
    """Byte-level BPE (GPT-2, Qwen, Llama 3, Phi-4) spells every byte as one printable character:
    the printable Latin-1 bytes as themselves, the other 68 bytes as chr(256), chr(257), ... in byte
    order. Returns char -> byte."""
    printable = [*range(ord('!'), ord('~') + 1),
                 *range(ord('¡'), ord('¬') + 1),
                 *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def tokenizer_name(tok):
    return getattr(getattr(tok, 'tok', None), 'name_or_path', None) or type(tok).__name__


@functools.cache
def token_bytes(tok):
    """(bytes of each token id, their lengths as an int64 array). A special token spells its text,
    as decode does."""
    if hasattr(tok, 'enc'):
        # tiktoken (the byte tokenizer) knows each token's bytes
        table = [tok.enc.decode_single_token_bytes(i) for i in range(tok.enc.n_vocab)]
    elif hasattr(tok, 'tok'):
        # Hugging Face: only byte-level BPE spells tokens in bytes we can read back
        from tokenizers import decoders
        hf = tok.tok
        decoder = getattr(getattr(hf, 'backend_tokenizer', None), 'decoder', None)
        if not isinstance(decoder, decoders.ByteLevel):
            raise ValueError(f"tokenizer {tokenizer_name(tok)!r} is not byte-level BPE "
                             f"(its decoder is {type(decoder).__name__}): "
                             "cross-tokenizer alignment needs each token's bytes")
        alphabet = _byte_level_alphabet()
        added = {i: t.content.encode() for i, t in hf.added_tokens_decoder.items()}
        pieces = hf.convert_ids_to_tokens(list(range(len(hf))))
        table = [added[i] if i in added else bytes(alphabet[c] for c in p) if p else b''
                 for i, p in enumerate(pieces)]
    else:
        raise ValueError(f"tokenizer {tokenizer_name(tok)!r}: no way to read each token's bytes")
    return table, np.array([len(b) for b in table], dtype=np.int64)


def byte_ends(tok, ids):
    """The UTF-8 byte offset where each token of ids ends, counted from the first; a stop token
    is one byte, and so is an id outside the tokenizer."""
    ids = np.asarray(ids, dtype=np.int64)
    table_lengths = token_bytes(tok)[1]
    known = (ids >= 0) & (ids < len(table_lengths))
    lengths = np.ones(len(ids), dtype=np.int64)
    lengths[known] = table_lengths[ids[known]]
    lengths[np.isin(ids, tok.eos_ids)] = 1
    return np.cumsum(lengths)


def spelled(tok, ids):
    """The bytes ids spell; an id outside the tokenizer spells NOT_TEXT."""
    table = token_bytes(tok)[0]
    return b''.join([table[i] if 0 <= i < len(table) else NOT_TEXT for i in ids])


@functools.cache
def end_of_turn(tok):
    """The stop token that closes an assistant turn in tok's chat template: the first
    stop token after the content, found by rendering two conversations that differ only
    in the assistant's reply."""
    if hasattr(tok, 'tok') and not tok.tok.chat_template:
        raise ValueError(f"teacher tokenizer {tokenizer_name(tok)!r} has no chat template: "
                         "the teacher must read the prompt through its own template")
    a, b = (tok.chat([{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': reply}])
            for reply in ('yes', 'no'))
    start = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    eot = next((t for t in a[start:] if t in tok.eos_ids), None) if start is not None else None
    if eot is None:
        raise ValueError(f"teacher tokenizer {tokenizer_name(tok)!r}: its chat template closes "
                         f"an assistant turn with none of its stop tokens {tok.eos_ids}")
    return eot


def check_tokenizers(student_tok, teacher_tok):
    """Everything that can be known before the first rollout: both tokenizers' token bytes spell
    what they encode (on tokenizer.PROBE_TEXTS), and the teacher has a chat template that ends a
    turn with a stop token."""
    for tok in (student_tok, teacher_tok):
        for text in PROBE_TEXTS:
            if spelled(tok, tok.encode(text)) != text.encode():
                raise ValueError(f"tokenizer {tokenizer_name(tok)!r}: its tokens' bytes do not "
                                 f"spell the text they encode ({text!r}); "
                                 "cross-tokenizer alignment needs byte-level tokens")
    end_of_turn(teacher_tok)


# ---------------------------------------------------------------- the teacher's view of one rollout

def response_text(student_tok, response_ids, finished):
    """The text (UTF-8 bytes) of a student response, without its stop token, and whether the teacher
    reads all of it (then its end of turn closes it when the student stopped). The text ends before
    the first byte that is not UTF-8 (a cut-off character of a truncated response, a stray byte of a
    byte-level student, an id outside the tokenizer) and before a stop token inside the response:
    no teacher token can read on from there, so the chunks both models read stop there and the rest
    of the response is not compared."""
    ids = list(response_ids)
    stops = [k for k, t in enumerate(ids) if t in student_tok.eos_ids]
    whole = finished and bool(stops) and stops[0] == len(ids) - 1
    if stops:
        ids = ids[:stops[0]]
    raw = spelled(student_tok, ids)
    try:
        raw.decode('utf-8')
    except UnicodeDecodeError as e:
        return raw[:e.start], False
    return raw, whole


def first_difference(a, b):
    """The first byte offset where a and b differ (the shorter length if one is the other's
    start; len(a) if they are equal)."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def teacher_response(teacher_tok, text, finished):
    """The response text re-encoded by the teacher, read as text (special-token spellings stay
    text), closed by its end of turn when the student stopped. Where the teacher's tokens do not
    spell the text back (a normaliser changed it, or a tokenizer that cannot split special tokens
    read a stop token), the teacher keeps only its tokens that end by the first byte that differs,
    and gets no end of turn. Returns (ids, whether the teacher read all of the text)."""
    ids = teacher_tok.encode_text(text.decode('utf-8'))
    stops = [k for k, t in enumerate(ids) if t in teacher_tok.eos_ids]
    if stops:
        ids = ids[:stops[0]]
    back = spelled(teacher_tok, ids)
    if back == text:
        return (ids + [end_of_turn(teacher_tok)] if finished else ids), True
    same_up_to = first_difference(back, text)
    ends = byte_ends(teacher_tok, ids)
    return ids[:int(np.searchsorted(ends, same_up_to, side='right'))], False


def teacher_view(student_tok, teacher_tok, messages, response_ids, finished,
                 enable_thinking=False):
    """The teacher's (prompt ids, response ids) for one rollout. messages: the conversation the
    student's prompt was rendered from; finished: the response ended with the student's stop token
    (finish == 'stop')."""
    text, whole = response_text(student_tok, response_ids, finished)
    return (teacher_tok.chat(messages, enable_thinking=enable_thinking),
            teacher_response(teacher_tok, text, whole)[0])


# --------------------------------------------------------------------- chunks both models have read

def align_chunks(s_ends, t_ends, whitespace_only=False, text=None):
    """Chunks of the response that both tokenizations read exactly: one closes at each byte offset
    where a token ends on both sides. Returns (pairs, s_spans, t_spans): pairs (C, 2) the response
    positions (student, teacher) of each chunk's last token; spans (C, 2) each chunk's [start, end)
    token range on each side. Tokens after the last common offset (an incomplete character of a
    truncated response) are in no chunk.

    whitespace_only: a chunk closes only where the text next holds whitespace, or at its end (ALM,
    arXiv 2503.20083: chunks ending mid-word are biased); the chunks in between merge into it. Needs
    text (the response's UTF-8 bytes, or str)."""
    s_ends = np.asarray(s_ends, dtype=np.int64)
    t_ends = np.asarray(t_ends, dtype=np.int64)
    closes = np.intersect1d(s_ends, t_ends)  # sorted, unique
    if whitespace_only:
        if text is None:
            raise ValueError("align_chunks(whitespace_only=True) needs the response text")
        raw = np.frombuffer(text.encode() if isinstance(text, str) else text, np.uint8)
        inside = closes < len(raw)
        keep = ~inside
        keep[inside] = np.isin(raw[closes[inside]], WHITESPACE)
        closes = closes[keep]
    # the last token reaching each offset (a zero-byte token joins the chunk it ends with)
    s_last = np.searchsorted(s_ends, closes, side='right') - 1
    t_last = np.searchsorted(t_ends, closes, side='right') - 1
    # a chunk starts after the previous one's last token
    spans = [np.stack([np.concatenate([[0], last[:-1] + 1])[:len(last)], last + 1], axis=1)
             for last in (s_last, t_last)]
    return np.stack([s_last, t_last], axis=1), spans[0], spans[1]


@dataclass
class TeacherView:
    """What one rollout means to the teacher: its ids and the chunks both models read."""
    # the conversation through the teacher's chat template
    prompt_ids: list
    # the response text in the teacher's tokens (+ its end of turn if the student stopped)
    response_ids: list
    pairs: np.ndarray      # (C, 2) response positions (student, teacher) of each chunk's last token
    s_spans: np.ndarray    # (C, 2) each chunk's [start, end) student tokens
    t_spans: np.ndarray    # (C, 2) each chunk's [start, end) teacher tokens
    # bytes of the response text inside the chunks compared, and of the whole response (its stop
    # token not counted; an id outside the tokenizer as one byte)
    compared_bytes: int = 0
    response_bytes: int = 0

    @property
    def aligned(self):
        """At least one chunk of the response is compared."""
        return len(self.pairs) > 0


def align_rollout(student_tok, teacher_tok, messages, response_ids, finished, whitespace_only=False,
                  enable_thinking=False):
    """teacher_view and align_chunks for one rollout: the per-rollout work beside the sampler
    (lab/bench.py times it)."""
    text, whole = response_text(student_tok, response_ids, finished)
    t_response = teacher_response(teacher_tok, text, whole)[0]
    s_ends = byte_ends(student_tok, response_ids)
    t_ends = byte_ends(teacher_tok, t_response)
    pairs, s_spans, t_spans = align_chunks(s_ends, t_ends, whitespace_only, text)
    t_prompt = teacher_tok.chat(messages, enable_thinking=enable_thinking)
    # the last chunk's end, less the stop token's byte past the text
    compared = min(int(s_ends[pairs[-1, 0]]), len(text)) if len(pairs) else 0
    stops = np.isin(np.asarray(response_ids, dtype=np.int64), student_tok.eos_ids)
    total = int(s_ends[-1]) - int(stops.sum()) if len(response_ids) else 0
    return TeacherView(t_prompt, t_response, pairs, s_spans, t_spans, compared, total)


def rollout_view(messages, response_ids, finish, student_tok, teacher_tok, whitespace_only=False,
                 enable_thinking=False):
    """align_rollout of one rollout as distill.py holds it (batch.Rollout's messages,
    response and finish)."""
    return align_rollout(student_tok, teacher_tok, messages, response_ids, finish == 'stop',
                         whitespace_only, enable_thinking)


class Aligner:
    """Beside the sampler: passed as generate()'s on_sample(i, j, sample), it starts the
    rollout_view of prompt i's j-th sample on a worker thread as soon as the sampler hands it over
    (vLLM: as its request finishes, while the engine samples the rest); view(i, j) waits for it.
    distill.py carries it as the rollout's view. keep(i, j): the samples to align (default all;
    under tensor parallelism a rank trains on every tp-th)."""
    pool = None  # one worker thread for the process, made on first use

    def __init__(self, messages, student_tok, teacher_tok, whitespace_only=False,
                 enable_thinking=False, keep=None):
        self.messages = messages
        self.views = {}
        self.keep = keep or (lambda i, j: True)
        self.args = (student_tok, teacher_tok, whitespace_only, enable_thinking)
        Aligner.pool = Aligner.pool or ThreadPoolExecutor(1, thread_name_prefix='align')

    def __call__(self, i, j, sample):
        if self.keep(i, j):
            self.views[i, j] = self.pool.submit(rollout_view, self.messages[i], sample.tokens,
                                                sample.finish, *self.args)

    def view(self, i, j):
        return self.views[i, j].result()


def state_positions(view, s_prompt_len, t_prompt_len, align='predict'):
    """Sequence positions (student, teacher), each (C,), of the hidden states OPRD compares: states
    where both models have read the same text. 'token': each chunk's last token; 'predict': the
    state just before each chunk (the previous chunk's last token; the prompt's last for the first
    chunk). Identical tokenizers: the positions losses.response_masks picks with positions='all'."""
    # the column of each chunk's span that holds the state:
    # its end ('token') or its start ('predict')
    edge = 1 if align == 'token' else 0
    return s_prompt_len + view.s_spans[:, edge] - 1, t_prompt_len + view.t_spans[:, edge] - 1
