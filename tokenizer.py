"""
The tokenizers behind rollouts, training and evaluation: a checkpoint's Hugging Face tokenizer with
its chat template, or the built-in byte-level one of the tiny task. Teacher and student must turn a
prompt into the same ids; same_tokenization compares what two tokenizers do on probe texts and a
chat.

    tok = load_tokenizer("path/to/hf_dir")     # or "byte"
    # the user message through the chat template, ready to generate
    ids = tok.chat("What is 12 + 30?")
"""
import hashlib
import json
import os

PROBE_TEXTS = ("What is 12 + 30? The answer is \\boxed{42}.",
               "  two  spaces,\ttabs\nand\r\nnewlines  ",
               "Ünïcödé ✓ 数学 🙂 <|im_end|> <|endoftext|>",
               "x^2 - 5x + 6 = 0  =>  x \\in \\{2, 3\\}")
PROBE_CHAT = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "What is 12 + 30?"}]


class Tokenizer:
    """One interface, two implementations below.

    vocab_size: number of real tokens (a model's embedding may be padded beyond it)
    eos_ids: the stop tokens: EOS and the chat template's end of turn
    pad_id: a token to pad with (never attended to)
    """
    vocab_size: int
    eos_ids: list
    pad_id: int

    def encode(self, text):
        """Token ids of text; text that spells a special token becomes that token."""
        raise NotImplementedError

    def encode_text(self, text):
        """Token ids of text read as text: a special token's spelling stays ordinary tokens (how
        a teacher reads a response the student wrote, align.py)."""
        raise NotImplementedError

    def decode(self, ids, skip_special=False):
        """The text of ids up to the first id the tokenizer does not have (an embedding's padding
        row), which ends it."""
        raise NotImplementedError

    def known_prefix(self, ids):
        """ids up to the first one outside the tokenizer (0 <= id < vocab_size)."""
        ids = list(ids)
        unknown = next((k for k, i in enumerate(ids) if not 0 <= i < self.vocab_size), len(ids))
        return ids[:unknown]

    def chat(self, messages, enable_thinking=False):
        """The rendered prompt (token ids) for a conversation, ending with the assistant's
        generation prompt. messages: [{'role': ..., 'content': ...}, ...], or a str for
        one user message."""
        raise NotImplementedError

    def fingerprint(self):
        """A short hex digest of how this tokenizer tokenizes: ids of probe texts and of a rendered
        chat (with and without thinking), the stop ids and the vocabulary size. Equal fingerprints =
        interchangeable for rollouts (teacher and student must see the same token ids)."""
        probe = [self.encode(t) for t in PROBE_TEXTS]
        probe += [self.chat(PROBE_CHAT, enable_thinking=flag) for flag in (False, True)]
        blob = json.dumps([self.vocab_size, sorted(self.eos_ids), probe])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def same_tokenization(a, b):
    return a.fingerprint() == b.fingerprint()


class HFTokenizer(Tokenizer):
    """A checkpoint's own tokenizer (transformers' AutoTokenizer), chat through
    its chat template."""

    def __init__(self, path):
        from transformers import AutoTokenizer, GenerationConfig
        self.tok = AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(self.tok)
        eos = {self.tok.eos_token_id} - {None}
        # generation_config.json often lists more stop tokens than the tokenizer's one eos_token
        try:
            e = GenerationConfig.from_pretrained(path).eos_token_id
            eos |= set(e if isinstance(e, list) else [e]) - {None}
        except OSError:
            pass
        # the template's end-of-turn: a Qwen base model's eos is <|endoftext|>, but its chat turns
        # end in <|im_end|>
        if "<|im_end|>" in (self.tok.chat_template or "") and "<|im_end|>" in self.tok.get_vocab():
            eos.add(self.tok.convert_tokens_to_ids("<|im_end|>"))
        if not eos:
            raise ValueError(f"tokenizer at {path!r} names no EOS token "
                             "(neither tokenizer_config.json nor generation_config.json)")
        self.eos_ids = sorted(eos)
        self.pad_id = (self.tok.pad_token_id if self.tok.pad_token_id is not None
                       else self.eos_ids[0])
        # a copy of the Rust tokenizer that splits special-token text into ordinary tokens: its own
        # object, so the flag never changes under another thread's encode
        self.text_tok = None
        backend = getattr(self.tok, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_special_tokens"):
            from tokenizers import Tokenizer as RustTokenizer
            self.text_tok = RustTokenizer.from_str(backend.to_str())
            self.text_tok.encode_special_tokens = True

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def encode_text(self, text):
        # a tokenizer that cannot split special tokens reads them as specials (align.py cuts the
        # text there)
        if self.text_tok is None:
            return self.encode(text)
        return self.text_tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special=False):
        return self.tok.decode(self.known_prefix(ids), skip_special_tokens=skip_special)

    def chat(self, messages, enable_thinking=False):
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        # render then encode, exactly what apply_chat_template(tokenize=True) does; Qwen3's template
        # reads enable_thinking (False inserts an empty <think></think>), others ignore it
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                            enable_thinking=enable_thinking)
        return self.encode(text)


class ByteTokenizer(Tokenizer):
    """The built-in byte-level tokenizer for the project's tiny task: tokens 0..255 are the bytes,
    then three special tokens; a tiktoken Encoding built in code (no merges). Chat is ChatML, as
    Qwen's: <|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n. It has no thinking
    tokens, so enable_thinking changes nothing."""
    SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

    def __init__(self):
        import tiktoken
        self.enc = tiktoken.Encoding(
            "oprd-byte",
            # no merges: the split only bounds chunks
            pat_str=r"\S+|\s+",
            mergeable_ranks={bytes([i]): i for i in range(256)},
            special_tokens={s: 256 + i for i, s in enumerate(self.SPECIALS)})
        self.vocab_size = self.enc.n_vocab  # 259
        self.pad_id, self.start_id, self.end_id = 256, 257, 258
        self.eos_ids = [256, 258]

    def encode(self, text):
        # special-token text becomes the special token, as in HF
        return self.enc.encode(text, allowed_special="all")

    def encode_text(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids, skip_special=False):
        ids = self.known_prefix(ids)
        if skip_special:
            ids = [i for i in ids if i < 256]
        return self.enc.decode(ids, errors="replace")

    def chat(self, messages, enable_thinking=False):
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = []
        for m in messages:  # content is encoded as plain text: it cannot inject special tokens
            turn = self.enc.encode_ordinary(f"{m['role']}\n{m['content']}")
            ids += [self.start_id] + turn + [self.end_id]
            ids += self.enc.encode_ordinary("\n")
        return ids + [self.start_id] + self.enc.encode_ordinary("assistant\n")


def load_tokenizer(path_or_name):
    """'byte' or a checkpoint marked by mark_byte_tokenizer = the built-in byte-level tokenizer;
    else the tokenizer files of an HF checkpoint folder (or hub id)."""
    config = os.path.join(str(path_or_name), "config.json")
    if path_or_name == "byte" or (os.path.isfile(config)
                                  and read_json(config).get(BYTE_MARK) == "byte"):
        return ByteTokenizer()
    return HFTokenizer(path_or_name)


BYTE_MARK = "oprd_tokenizer"


def mark_byte_tokenizer(path):
    """Record in a checkpoint's config.json that it speaks the built-in byte tokenizer (it has
    no tokenizer files). The key survives model.save_pretrained, which writes the loaded
    config.json back unchanged."""
    config = os.path.join(path, "config.json")
    d = read_json(config)
    d[BYTE_MARK] = "byte"
    with open(config, "w") as f:
        json.dump(d, f, indent=2)


def read_json(path):
    with open(path) as f:
        return json.load(f)
