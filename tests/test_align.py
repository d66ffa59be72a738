"""align.py: the teacher's view of a rollout across tokenizers, the byte-offset chunks, chunk-level
OPD. Tokenizers are built offline with the `tokenizers` library; expected chunks come from hand-made
splits or an independent walk."""
import json

import pytest
import torch
import torch.nn.functional as F

from align import (align_chunks, align_rollout, byte_ends, check_tokenizers, end_of_turn,
                   state_positions, teacher_view, token_bytes)
from conftest import build_tokenizer
from batch import response_masks
from losses import chunk_opd_loss, output_loss_chunk
from tokenizer import ByteTokenizer, load_tokenizer

PHI_SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
PHI_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
ARITH = ("12+30=42, 7*6=42, 100-58=42, (3+4)*6=42. The answer is 42.\n"
         "So 12+30 = 42 and é数 too.\n") * 40
MESSAGES = [{"role": "user", "content": "What is 12 + 30?"}]


def save_hf(tk, out_dir, specials=PHI_SPECIALS, template=PHI_TEMPLATE, eos="<|end|>", stops=None,
            normalizer=None):
    """Save a tokenizers.Tokenizer as an HF tokenizer folder (with a generation_config listing
    `stops`); load it."""
    from transformers import PreTrainedTokenizerFast
    tk.add_special_tokens(specials)
    if normalizer is not None:
        tk.normalizer = normalizer
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=specials[0])
    if template:
        fast.chat_template = template
    fast.save_pretrained(out_dir)
    if stops:
        with open(f"{out_dir}/generation_config.json", "w") as f:
            json.dump({"eos_token_id": [tk.token_to_id(s) for s in stops]}, f)
    return load_tokenizer(str(out_dir))


def byte_level(vocab=None, merges=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tk = Tokenizer(models.BPE(vocab, merges) if vocab is not None else models.BPE())
    # no regex split: merges may cross digit, operator and word boundaries
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return tk


def phi_like(out_dir, normalizer=None, template=PHI_TEMPLATE):
    """A byte-level BPE trained on arithmetic, with a Phi-like chat template and two stop tokens."""
    from tokenizers import pre_tokenizers, trainers
    tk = byte_level()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([ARITH], trainer)
    return save_hf(tk, out_dir, stops=["<|endoftext|>", "<|end|>"], normalizer=normalizer,
                   template=template)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("align")
    build_tokenizer(d / "qwen")
    return {"byte": ByteTokenizer(), "qwen": load_tokenizer(str(d / "qwen")),
            "phi": phi_like(d / "phi")}


def walk_chunks(s_pieces, t_pieces):
    """GOLD's grouping by hand: add tokens to whichever side has read fewer characters,
    close when equal."""
    chunks = []
    # tokens taken and characters read on each side, and where the open chunk starts
    i, j = 0, 0
    n_s, n_t = 0, 0
    start = (0, 0)
    while i < len(s_pieces) and j < len(t_pieces):
        if n_s <= n_t:
            n_s += len(s_pieces[i])
            i += 1
        if n_t < n_s:
            n_t += len(t_pieces[j])
            j += 1
        if n_s == n_t:
            chunks.append(((start[0], i), (start[1], j)))
            start = (i, j)
    return chunks


def test_identical_tokenizers_align_token_by_token(toks):
    for tok in (toks["byte"], toks["qwen"]):
        text = "x = 12 + 30, so x is 42.\né数🙂"
        ids = tok.encode(text) + [tok.eos_ids[-1]]
        check_tokenizers(tok, tok)
        view = align_rollout(tok, tok, MESSAGES, ids, finished=True)
        assert view.prompt_ids == tok.chat(MESSAGES)
        assert view.response_ids == ids
        n = len(ids)
        assert view.pairs.tolist() == [[i, i] for i in range(n)]
        assert view.s_spans.tolist() == view.t_spans.tolist() == [[i, i + 1] for i in range(n)]


@pytest.mark.parametrize("align", ["predict", "token"])
def test_state_positions_are_response_masks_for_one_tokenizer(toks, align):
    byte = toks["byte"]
    ids = byte.encode("12+30=42") + [258]
    view = align_rollout(byte, byte, MESSAGES, ids, finished=True)
    P = len(view.prompt_ids)
    # three pad positions after the rollout
    resp = torch.zeros(1, P + len(ids) + 3, dtype=torch.bool)
    resp[0, P:P + len(ids)] = True
    expected = response_masks(resp, "all", 0, align)[0].nonzero()[:, 0].tolist()
    s_pos, t_pos = state_positions(view, P, P, align)
    assert s_pos.tolist() == t_pos.tolist() == expected


def test_permuted_ids_same_splits_align_as_identity(toks, tmp_path):
    """A teacher whose ids are a permutation of the student's:
    other ids, same tokens, identity alignment."""
    from tokenizers import Tokenizer
    spec = json.loads(toks["qwen"].tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    names = sorted(vocab, key=vocab.get)
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(0)).tolist()
    spec["model"]["vocab"] = {names[p]: i for i, p in enumerate(perm)}
    specials = [t["content"] for t in spec.pop("added_tokens")]
    teacher = save_hf(Tokenizer.from_str(json.dumps(spec)), tmp_path, specials=specials,
                      template=toks["qwen"].tok.chat_template, eos="<|im_end|>")
    student = toks["qwen"]
    text = "The answer is \\boxed{42}. What is 12 + 30?"
    ids = student.encode(text) + student.eos_ids
    t_prompt, t_resp = teacher_view(student, teacher, MESSAGES, ids, finished=True)
    assert t_resp != ids and t_prompt != student.chat(MESSAGES)
    assert student.tok.convert_ids_to_tokens(ids) == teacher.tok.convert_ids_to_tokens(t_resp)
    view = align_rollout(student, teacher, MESSAGES, ids, finished=True)
    assert view.pairs.tolist() == [[i, i] for i in range(len(ids))]


@pytest.mark.parametrize("student", ["byte", "qwen", "qwen_split"])
def test_chunks_match_an_independent_walk(toks, student):
    """Against the byte tokenizer or another BPE (also generating a non-canonical split): chunks
    match GOLD's walk over per-token texts; each chunk spells the same text on both sides; together
    they spell the response."""
    s_tok, t_tok = toks["qwen" if student == "qwen_split" else student], toks["phi"]
    text = "So 12+30=42, (3+4)*6=42 and 100-58 = 42. The answer is 42."
    if student == "qwen_split":
        ids = [i for ch in text for i in s_tok.encode(ch)]
    else:
        ids = s_tok.encode(text)
    view = align_rollout(s_tok, t_tok, MESSAGES, ids + s_tok.eos_ids[-1:], finished=True)
    t_text_ids = view.response_ids[:-1]
    assert view.response_ids[-1] == t_tok.tok.convert_tokens_to_ids("<|end|>")
    s_pieces = [s_tok.decode([i]) for i in ids]  # ASCII text: each token decodes on its own
    t_pieces = [t_tok.decode([i]) for i in t_text_ids]
    end_of_turn_chunk = ((len(ids), len(ids) + 1), (len(t_text_ids), len(t_text_ids) + 1))
    expected = walk_chunks(s_pieces, t_pieces) + [end_of_turn_chunk]
    spans = zip(view.s_spans.tolist(), view.t_spans.tolist())
    assert [(tuple(s), tuple(t)) for s, t in spans] == expected
    assert view.pairs.tolist() == [[s[1] - 1, t[1] - 1] for s, t in expected]
    chunk_texts = []
    for (a, b), (c, d) in expected[:-1]:
        assert s_tok.decode(ids[a:b]) == t_tok.decode(t_text_ids[c:d])
        chunk_texts.append(s_tok.decode(ids[a:b]))
    assert "".join(chunk_texts) == text
    # merges crossing digits/operators: chunks of several tokens
    assert max(b - a for (a, b), _ in expected) > 1
    if student == "qwen":  # and chunks of several teacher tokens
        assert max(d - c for _, (c, d) in expected) > 1


def test_multibyte_characters_split_differently(tmp_path):
    """é (2 bytes), 数 (3), 🙂 (4) split at different bytes by two hand-made byte-level
    BPEs: ends and chunks by hand."""
    from tokenizers import pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    spell = {}
    # the byte-level spelling of each character, by the tokenizers library itself
    byte_level_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for ch in "é数🙂":
        spell[ch] = byte_level_split.pre_tokenize_str(ch)[0][0]
    e, shu, smile = spell["é"], spell["数"], spell["🙂"]

    def make(merges, out):
        vocab = {c: i for i, c in enumerate(sorted(alphabet))}
        for a, b in merges:
            vocab[a + b] = len(vocab)
        return save_hf(byte_level(vocab, merges), out, stops=["<|end|>"])
    # student: é | e6 | 95 b0 | f0 9f | 99 82     teacher: c3 | a9 | e6 95 | b0 | f0 | 9f 99 82
    student = make([(e[0], e[1]), (shu[1], shu[2]), (smile[0], smile[1]), (smile[2], smile[3])],
                   tmp_path / "s")
    teacher = make([(smile[2], smile[3]), (shu[0], shu[1]), (smile[1], smile[2] + smile[3])],
                   tmp_path / "t")
    ids = student.encode("é数🙂")
    assert len(ids) == 5 and byte_ends(student, ids).tolist() == [2, 3, 5, 7, 9]
    view = align_rollout(student, teacher, MESSAGES, ids, finished=False)
    assert byte_ends(teacher, view.response_ids).tolist() == [1, 2, 4, 5, 6, 9]
    assert view.s_spans.tolist() == [[0, 1], [1, 3], [3, 5]]
    assert view.t_spans.tolist() == [[0, 2], [2, 4], [4, 6]]
    assert view.pairs.tolist() == [[0, 1], [2, 3], [4, 5]]
    # states both have read up to a chunk's end:
    # its last tokens, or (predict) those before each chunk
    token = [p.tolist() for p in state_positions(view, 10, 20, "token")]
    predict = [p.tolist() for p in state_positions(view, 10, 20, "predict")]
    assert token == [[10, 12, 14], [21, 23, 25]]
    assert predict == [[9, 10, 12], [19, 21, 23]]
    # the byte tokenizer reads one byte a token; its end of turn is one byte more
    byte = ByteTokenizer()
    assert byte_ends(byte, byte.encode("é数🙂") + [258]).tolist() == list(range(1, 11))


def test_token_bytes_follow_the_byte_level_alphabet(toks):
    """Every one-character token of a byte-level BPE is one byte, as transformers' GPT-2
    table spells it."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    phi = toks["phi"]
    table, lengths = token_bytes(phi)
    singles = {t: i for t, i in phi.tok.get_vocab().items() if len(t) == 1}
    assert len(singles) == 256
    assert all(table[i] == bytes([byte_of[t]]) for t, i in singles.items())
    assert table[phi.tok.convert_tokens_to_ids("<|end|>")] == b"<|end|>"
    assert lengths.tolist() == list(map(len, table))


def test_truncated_inside_a_character_leaves_the_tail_out(toks):
    byte, phi = toks["byte"], toks["phi"]
    ids = byte.encode("12+30=42 数")[:-1]  # cut after two of the three bytes of 数
    view = align_rollout(byte, phi, MESSAGES, ids, finished=False)
    assert phi.decode(view.response_ids) == "12+30=42 "
    # the incomplete character's two bytes are in no chunk
    assert view.s_spans[-1, 1] == len(ids) - 2


def test_whitespace_only_merges_chunks_up_to_whitespace(toks):
    byte = toks["byte"]
    ids = byte.encode("ab cd\nef") + [258]
    ends = byte_ends(byte, ids)
    pairs, s_spans, t_spans = align_chunks(ends, ends, True, "ab cd\nef")
    assert s_spans.tolist() == t_spans.tolist() == [[0, 2], [2, 5], [5, 8], [8, 9]]
    assert pairs.tolist() == [[1, 1], [4, 4], [7, 7], [8, 8]]
    text = "So 12+30=42, (3+4)*6=42 and 100-58 = 42."
    view = align_rollout(byte, toks["phi"], MESSAGES, byte.encode(text), finished=False,
                         whitespace_only=True)
    # every byte is a student token, so chunks close where a teacher token ends
    # (its merges cross spaces too)
    t_ends = [len(toks["phi"].decode(view.response_ids[:j + 1]))
              for j in range(len(view.response_ids))]
    expected = [e for e in t_ends if e == len(text) or text[e].isspace()]
    assert [e for _, e in view.s_spans.tolist()] == expected and len(expected) > 2
    with pytest.raises(ValueError, match="needs the response text"):
        align_chunks([1, 2], [1, 2], whitespace_only=True)


def token_logprobs(h, w, targets):
    return F.log_softmax(h @ w.T, dim=-1).gather(1, targets[:, None])[:, 0]


def test_chunk_opd_is_token_opd_for_one_token_chunks():
    g = torch.Generator().manual_seed(0)
    n, d, V = 9, 8, 17
    h_s = torch.randn(n, d, generator=g, requires_grad=True)
    h_t = torch.randn(n, d, generator=g)
    w_s = torch.randn(V, d, generator=g)
    w_t = torch.randn(V, d, generator=g)
    y = torch.randint(0, V, (n,), generator=g)
    ref, ref_gap, _ = output_loss_chunk('opd', h_s, h_t, y, w_s, w_t, V, 0)
    (g_ref,) = torch.autograd.grad(ref, h_s)
    spans = [[i, i + 1] for i in range(n)]
    loss, gap = chunk_opd_loss(token_logprobs(h_s, w_s, y), token_logprobs(h_t, w_t, y),
                               spans, spans)
    (g_mine,) = torch.autograd.grad(loss, h_s)
    assert gap == pytest.approx(ref_gap.item(), rel=1e-6)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(g_mine, g_ref, rtol=0, atol=0)


def test_chunk_opd_matches_a_hand_loop_with_gradient():
    g = torch.Generator().manual_seed(1)
    lp_s = torch.randn(12, generator=g).sub(2).requires_grad_()
    lp_t = torch.randn(9, generator=g).sub(2)
    s_spans = [[0, 3], [3, 4], [4, 8], [10, 12]]  # tokens 8, 9 in no chunk (a truncated tail)
    t_spans = [[0, 1], [1, 4], [4, 6], [6, 9]]
    loss, gap = chunk_opd_loss(lp_s, lp_t, s_spans, t_spans)
    (grad,) = torch.autograd.grad(loss, lp_s)
    ref, gap_ref = 0.0, 0.0
    for (a, b), (c, e) in zip(s_spans, t_spans):
        l_s, l_t = lp_s[a:b].sum(), lp_t[c:e].sum()
        ref = ref + (l_s - l_t).detach() * l_s
        gap_ref += (l_s - l_t).item()
    (grad_ref,) = torch.autograd.grad(ref, lp_s)
    assert gap == pytest.approx(gap_ref, rel=1e-6)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-6)
    assert grad[8:10].abs().sum() == 0


def test_end_of_turn_is_the_templates(toks):
    assert end_of_turn(toks["byte"]) == 258
    assert end_of_turn(toks["qwen"]) == toks["qwen"].tok.convert_tokens_to_ids("<|im_end|>")
    phi = toks["phi"]  # two stop tokens; the template closes a turn with <|end|>
    assert len(phi.eos_ids) == 2 and end_of_turn(phi) == phi.tok.convert_tokens_to_ids("<|end|>")


def test_a_missing_template_is_refused(toks, tmp_path):
    with pytest.raises(ValueError, match="has no chat template"):
        check_tokenizers(toks["byte"], phi_like(tmp_path / "bare", template=None))


def test_what_the_teacher_cannot_read_ends_the_text_without_a_refusal(toks, tmp_path):
    """A rollout never raises: the text both read ends before a normaliser's change, a byte that
    is not UTF-8, a stop token inside the response; a finished rollout without its stop token is
    read as truncated. Expected chunks: the byte student's one-byte tokens against the teacher's
    own encoding of the text kept, walked by hand."""
    from tokenizers import normalizers
    byte, phi = toks["byte"], toks["phi"]
    infinity = phi_like(tmp_path / "inf", normalizer=normalizers.Replace("∞", "inf"))
    # the probe texts pass; the rollout below is read up to the ∞ (bytes 0..4, "x -> ")
    check_tokenizers(byte, infinity)
    view = align_rollout(byte, infinity, MESSAGES, byte.encode("x -> ∞") + [258], True)
    kept = infinity.encode("x -> ")
    assert view.response_ids == kept[:len(view.response_ids)]
    assert infinity.decode(view.response_ids) == "x -> "[:byte_ends(infinity, kept)[-1]]
    expected = walk_chunks(list("x -> "), [infinity.decode([t]) for t in view.response_ids])
    assert view.s_spans.tolist() == [list(s) for s, _ in expected]
    assert (view.compared_bytes, view.response_bytes) == (5, 8)
    # a stray byte that is not UTF-8: the text both read ends before it, no end of turn
    stray = align_rollout(byte, phi, MESSAGES, [65, 0xff, 66, 258], True)
    assert stray.response_ids == phi.encode("A") and stray.pairs.tolist() == [[0, 0]]
    assert (stray.compared_bytes, stray.response_bytes) == (1, 3)
    # a stop token inside the response ends the text there
    early = align_rollout(byte, phi, MESSAGES, byte.encode("42") + [258] + byte.encode("7"), True)
    assert early.response_ids == phi.encode("42") and early.pairs[-1, 0] == 1
    # finished without its stop token: read as truncated, no end of turn
    _, t_response = teacher_view(byte, phi, MESSAGES, byte.encode("42"), True)
    assert t_response == phi.encode("42")


def test_the_aligner_aligns_the_samples_a_rank_keeps_on_its_thread(toks, monkeypatch):
    """align.Aligner as a sampler's on_sample: each kept sample's view, made on the worker thread,
    equals align_rollout's; samples keep() refuses are not aligned at all."""
    import threading

    import align
    from sampling import Sample
    s_tok, t_tok = toks["byte"], toks["phi"]
    texts = ["12+30=42", "The answer is 42.", "(3+4)*6", "100-58 = 42"]
    names = []
    real = align.rollout_view

    def recording_view(*a):
        names.append(threading.current_thread().name)
        return real(*a)
    monkeypatch.setattr(align, "rollout_view", recording_view)
    aligner = align.Aligner([MESSAGES, MESSAGES], s_tok, t_tok, keep=lambda i, j: j == 1)
    for k, text in enumerate(texts):  # prompt k // 2, sample k % 2, handed over one by one
        aligner(k // 2, k % 2, Sample(s_tok.encode(text) + s_tok.eos_ids[-1:], "stop"))
    views = {(i, 1): aligner.view(i, 1) for i in range(2)}
    assert sorted(aligner.views) == [(0, 1), (1, 1)] and len(names) == 2
    assert all(name.startswith("align") for name in names)
    for (i, j), view in views.items():
        ids = s_tok.encode(texts[2 * i + j]) + s_tok.eos_ids[-1:]
        want = align_rollout(s_tok, t_tok, MESSAGES, ids, True)
        assert view.response_ids == want.response_ids and view.pairs.tolist() == want.pairs.tolist()
