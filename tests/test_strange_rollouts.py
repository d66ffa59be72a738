"""A strange rollout never ends a run: ids the tokenizer does not have, text that spells a teacher's
special token, text the teacher's normaliser changes, a response cut inside a character. The
samplers never draw a padding row; the aligner compares what both models read as the same bytes,
and a rollout with nothing to compare is left out of the step and counted. Expected chunks come
from a hand walk over each token's bytes (the byte-level alphabet, read by transformers' own table),
not from align.py's numpy."""

import json
import os

import pytest
import torch
from conftest import ROOT, build_tokenizer, make_checkpoint
from safetensors.torch import load_file, save_file

from align import align_rollout, end_of_turn
from tokenizer import ByteTokenizer, load_tokenizer

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mini_bench.jsonl")
MESSAGES = [{"role": "user", "content": "What is 12 + 30?"}]
# the tokenizer has 384 ids; the model's embedding and head 512 rows
N_TOKENS = 384
ROWS = 512


def piece_bytes(tok, ids):
    """Each id's bytes, by transformers' byte-level table (ByteTokenizer: tiktoken's own)."""
    if isinstance(tok, ByteTokenizer):
        return [tok.enc.decode_single_token_bytes(i) for i in ids]
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    added = {i: t.content.encode() for i, t in tok.tok.added_tokens_decoder.items()}
    pieces = tok.tok.convert_ids_to_tokens(list(ids))
    return [added[i] if i in added else bytes(byte_of[c] for c in p)
            for i, p in zip(ids, pieces)]


def ends(pieces):
    """Cumulative byte ends of pieces (bytes each)."""
    out = []
    at = 0
    for p in pieces:
        at += len(p)
        out.append(at)
    return out


def hand_pairs(s_ends, t_ends, upto):
    """(student, teacher) positions of the last token reaching each byte offset both sides reach,
    up to upto bytes: GOLD's rule, by hand."""
    pairs = []
    for offset in sorted(set(s_ends) & set(t_ends)):
        if offset <= upto:
            s_last = max(k for k, e in enumerate(s_ends) if e == offset)
            t_last = max(k for k, e in enumerate(t_ends) if e == offset)
            pairs.append([s_last, t_last])
    return pairs


def with_normalizer(folder, normalizer):
    """The tokenizer of folder with a normaliser written into its tokenizer.json (Qwen's is
    NFC)."""
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as f:
        spec = json.load(f)
    spec["normalizer"] = normalizer
    with open(path, "w") as f:
        json.dump(spec, f)
    return str(folder)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("strange")
    build_tokenizer(root / "qwen")
    build_tokenizer(root / "nfc")
    with_normalizer(root / "nfc", {"type": "NFC"})
    return {"byte": ByteTokenizer(), "qwen": load_tokenizer(str(root / "qwen")),
            "nfc": load_tokenizer(str(root / "nfc"))}


# ----------------------------------------------------------------------------- the aligner

@pytest.mark.parametrize("special", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                     "</think>"])
def test_a_response_that_spells_a_teacher_special_token_is_read_as_text(toks, special):
    """The byte student writes the special token's text with ordinary tokens; the teacher reads that
    text as text (never its special id), then its own end of turn; every byte is compared."""
    byte, qwen = toks["byte"], toks["qwen"]
    text = f"4{special}2"
    response = byte.encode_text(text) + [byte.end_id]
    view = align_rollout(byte, qwen, MESSAGES, response, True)
    specials = set(qwen.tok.added_tokens_decoder)
    assert not specials & set(view.response_ids[:-1])
    assert view.response_ids[-1] == end_of_turn(qwen)
    t_pieces = piece_bytes(qwen, view.response_ids[:-1])
    assert b"".join(t_pieces) == text.encode()
    # the stop tokens count one byte past the text on both sides
    s_ends = ends(piece_bytes(byte, response[:-1])) + [len(text) + 1]
    t_ends = ends(t_pieces) + [len(text) + 1]
    assert view.pairs.tolist() == hand_pairs(s_ends, t_ends, len(text) + 1)
    assert (view.compared_bytes, view.response_bytes) == (len(text), len(text))


def test_decomposed_accents_against_an_nfc_teacher_compare_up_to_the_first_change(toks):
    """e + U+0301 (3 bytes) is read by an NFC teacher as é (2 bytes): the text both read ends
    at the first byte that differs, the teacher keeps its tokens up to there and no end of turn,
    and the rollout is partly aligned."""
    qwen, nfc = toks["qwen"], toks["nfc"]
    text = "the answer is 42, cafe\u0301 au lait"
    response = qwen.encode_text(text) + qwen.eos_ids[-1:]
    view = align_rollout(qwen, nfc, MESSAGES, response, True)
    first_change = text.index("e\u0301")
    s_pieces = piece_bytes(qwen, response[:-1])
    t_pieces = piece_bytes(nfc, view.response_ids)
    assert b"".join(t_pieces) == text.encode()[:len(b"".join(t_pieces))]
    assert len(b"".join(t_pieces)) <= first_change
    assert all(t not in nfc.eos_ids for t in view.response_ids)
    expected = hand_pairs(ends(s_pieces), ends(t_pieces), first_change)
    assert expected and view.pairs.tolist() == expected
    compared = ends(s_pieces)[expected[-1][0]]
    assert (view.compared_bytes, view.response_bytes) == (compared, len(text.encode()))
    assert view.compared_bytes < view.response_bytes


def test_a_response_cut_inside_a_character_leaves_the_character_out(toks):
    byte, qwen = toks["byte"], toks["qwen"]
    # 数 is 3 bytes: two of them made it
    response = byte.encode_text("12 数")[:-1]
    view = align_rollout(byte, qwen, MESSAGES, response, False)
    t_pieces = piece_bytes(qwen, view.response_ids)
    assert b"".join(t_pieces) == b"12 "
    expected = hand_pairs(ends(piece_bytes(byte, response)), ends(t_pieces), 3)
    assert view.pairs.tolist() == expected
    assert (view.compared_bytes, view.response_bytes) == (3, 5)


def test_an_id_past_the_tokenizer_ends_the_text_before_it(toks):
    """An embedding's padding row (id 400 of a 384-token tokenizer) in the response: the text both
    read ends before it; the rest of the rollout is not compared, and nothing raises."""
    qwen, byte = toks["qwen"], toks["byte"]
    response = qwen.encode_text("12 + 30") + [400] + qwen.encode_text(" = 42")
    view = align_rollout(qwen, byte, MESSAGES, response, False)
    assert view.response_ids == byte.encode_text("12 + 30")
    n_before = len(qwen.encode_text("12 + 30"))
    s_ends = ends(piece_bytes(qwen, response[:n_before]))
    assert view.pairs.tolist() == hand_pairs(s_ends, list(range(1, 8)), 7)
    assert (view.compared_bytes, view.response_bytes) == (7, 7 + 1 + 5)
    # first: nothing to compare, not aligned
    assert not align_rollout(qwen, byte, MESSAGES, [400] + response, False).aligned


def test_decode_ends_at_an_id_past_the_tokenizer(toks):
    """What eval.py grades: the decodable text before the first unknown id; no exception."""
    qwen, byte = toks["qwen"], toks["byte"]
    ids = qwen.encode_text("\\boxed{42}")
    assert qwen.decode(ids + [400] + ids) == "\\boxed{42}"
    assert byte.decode(byte.encode_text("\\boxed{42}") + [300, 65]) == "\\boxed{42}"


# ----------------------------------------------------------------------------- the samplers

@pytest.fixture(scope="module")
def padded_student(tmp_path_factory):
    """A 384-token tokenizer in a model with 512 embedding and head rows, whose padding rows'
    head weights are scaled up so that, unmasked, they win most draws."""
    folder = make_checkpoint(tmp_path_factory.mktemp("padded"), "qwen3", seed=5,
                             vocab_size=ROWS)
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    head = weights["lm_head.weight"].clone()
    head[N_TOKENS:] *= 30
    weights["lm_head.weight"] = head
    save_file(weights, path, metadata={"format": "pt"})
    return folder


def draws(sampler, tok):
    prompts = [tok.chat("What is 12 + 30?"), tok.chat("Add 7 and 5.")]
    out = sampler.generate(prompts, n=4, temperature=1.0, max_new_tokens=12, stop_ids=[],
                           seed=3)
    return [s.tokens for ss in out for s in ss]


def test_the_torch_sampler_never_draws_a_padding_row(padded_student):
    from sampler import TorchSampler
    tok = load_tokenizer(padded_student)
    unmasked = draws(TorchSampler(padded_student, device="cpu"), tok)
    assert max(max(t) for t in unmasked) >= N_TOKENS
    eager = draws(TorchSampler(padded_student, device="cpu", n_tokens=N_TOKENS), tok)
    static = draws(TorchSampler(padded_student, device="cpu", n_tokens=N_TOKENS,
                                decode="static"), tok)
    assert max(max(t) for t in eager) < N_TOKENS
    assert static == eager


@pytest.mark.skipif(not __import__("rollout").vllm_available(), reason="vLLM is not installed")
def test_the_vllm_sampler_never_draws_a_padding_row(padded_student):
    from rollout import make_sampler
    tok = load_tokenizer(padded_student)
    sampler = make_sampler("vllm", padded_student, seed=0, max_model_len=256,
                           enforce_eager=True, n_tokens=N_TOKENS)
    try:
        assert sampler.padding_bias == {i: float("-inf") for i in range(N_TOKENS, ROWS)}
        masked = draws(sampler, tok)
        sampler.padding_bias = None
        unmasked = draws(sampler, tok)
    finally:
        sampler.close()
    assert max(max(t) for t in masked) < N_TOKENS
    assert max(max(t) for t in unmasked) >= N_TOKENS


def test_too_many_padding_rows_for_vllm_is_one_line():
    from vllm_sampler import padding_bias
    assert padding_bias({"vocab_size": 512}, 512) is None
    assert padding_bias({"vocab_size": 512}, None) is None
    with pytest.raises(ValueError, match="1100 embedding rows past its tokenizer's 100 tokens"):
        padding_bias({"vocab_size": 1200}, 100)


# ----------------------------------------------------------------------------- a training step

class ScriptedSampler:
    """Stands in for the student's sampler: each sample of each prompt is the next response of a
    script (ids, finish), in turn."""

    def __init__(self, script):
        self.script = script
        self.dtype = torch.float32
        self.calls = 0

    def generate(self, prompts, n=1, on_sample=None, **kw):
        from sampling import Sample
        out = []
        for i in range(len(prompts)):
            row = []
            for j in range(n):
                ids, finish = self.script[(i * n + j) % len(self.script)]
                row.append(Sample(list(ids), finish, None))
                if on_sample:
                    on_sample(i, j, row[-1])
            out.append(row)
        self.calls += 1
        return out

    def update_weights(self, named_tensors):
        for _ in named_tensors:
            pass

    def sleep(self):
        pass

    def wake(self):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def cross_pair(tmp_path_factory):
    """A student with padding rows and the Qwen-like tokenizer; a teacher of another tokenizer (one
    more special token, Qwen's NFC normaliser)."""
    from test_cross_tokenizer import with_extra_special_token
    root = tmp_path_factory.mktemp("strange_pair")
    teacher = make_checkpoint(root / "teacher", "qwen3", seed=3)
    with_extra_special_token(teacher)
    with_normalizer(teacher, {"type": "NFC"})
    student = make_checkpoint(root / "student", "qwen3", seed=4, vocab_size=ROWS)
    return teacher, student


def strange_script(tok):
    """Four responses: a teacher stop token spelled out, a decomposed accent, a cut character, a
    padding row first (nothing to compare)."""
    eos = tok.eos_ids[-1]
    return [(tok.encode_text("4<|im_end|>2") + [eos], "stop"),
            (tok.encode_text("cafe\u0301 42") + [eos], "stop"),
            (tok.encode_text("12 数")[:-1], "length"),
            ([400] + tok.encode_text("12"), "length")]


def run_distill(main, monkeypatch, capsys, script, out, cross_pair, **kw):
    import rollout
    from test_bad_input import main_in_process
    monkeypatch.setattr(rollout, "make_sampler", lambda *a, **k: ScriptedSampler(script))
    teacher, student = cross_pair
    args = dict(student=student, teacher=teacher, out_dir=str(out), prompts=FIXTURE,
                backend="torch", device="cpu", prompts_per_step=4, n_samples=2, max_new_tokens=16,
                max_prompt_len=256, layers="all", positions="all", max_steps=2,
                micro_batch_size=3, lr=1e-3, warmup_frac=0.0, seed=0, check_tokens=0,
                method="opd_chunk+oprd")
    args.update(kw)
    argv = ["distill.py"] + [f"--{k}={v}" for k, v in args.items()]
    return main_in_process(main, argv, monkeypatch, capsys)


def hand_compared(s_tok, t_tok, ids, finish):
    """(bytes compared, response bytes) of one rollout, by hand: the student's bytes up to a stop
    or an unknown id, less a cut-off character; the teacher's reading of that text up to the first
    byte it changes; the last byte offset both tokenizations reach by then (the whole text when the
    teacher read all of it and the student stopped)."""
    known = []
    for i in ids:
        if i >= N_TOKENS or i in s_tok.eos_ids:
            break
        known.append(i)
    whole = finish == "stop" and len(known) == len(ids) - 1
    raw = b"".join(piece_bytes(s_tok, known))
    text = raw
    while True:
        try:
            text.decode("utf-8")
            break
        except UnicodeDecodeError:
            text = text[:-1]
            whole = False
    unknown = sum(1 for i in ids if i >= N_TOKENS)
    response_bytes = len(b"".join(piece_bytes(s_tok, [i for i in ids if i < N_TOKENS
                                                      and i not in s_tok.eos_ids]))) + unknown
    t_pieces = piece_bytes(t_tok, t_tok.encode_text(text.decode("utf-8")))
    back = b"".join(t_pieces)
    if back == text and whole:
        return len(text), response_bytes
    upto = len(text)
    if back != text:
        upto = next((k for k, (x, y) in enumerate(zip(back, text)) if x != y),
                    min(len(back), len(text)))
    s_ends = ends(piece_bytes(s_tok, known))
    common = [e for e in set(s_ends) & set(ends(t_pieces)) if e <= upto]
    return max(common, default=0), response_bytes


def test_strange_rollouts_run_to_the_end_of_their_steps_and_are_counted(
        cross_pair, tmp_path, settings_restored, monkeypatch, capsys):
    """Each step: 8 rollouts, two of each strange kind. The padding-row-first ones are left out
    (rollouts_unaligned 2, sequences 6); aligned_byte_share is the hand count of the bytes compared
    over all response bytes."""
    teacher, student = cross_pair
    s_tok = load_tokenizer(student)
    t_tok = load_tokenizer(teacher)
    script = strange_script(s_tok)
    code, stdout, err = run_distill(settings_restored.main, monkeypatch, capsys, script,
                                    tmp_path / "o", cross_pair)
    assert code == 0, "\n".join(err[-20:])
    counted = [hand_compared(s_tok, t_tok, ids, finish) for ids, finish in script]
    # every kind partly or wholly read, but the last
    assert [c > 0 for c, _ in counted] == [True, True, True, False]
    assert counted[0][0] == counted[0][1] and counted[1][0] < counted[1][1]
    compared = sum(c for c, _ in counted)
    total = sum(t for _, t in counted)
    with open(tmp_path / "o" / "log.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert r["rollouts_unaligned"] == 2 and r["sequences"] == 6
        assert r["aligned_byte_share"] == pytest.approx(compared / total, abs=1e-12)
    assert "2 rollouts left out" in stdout


def test_a_step_of_unusable_rollouts_stops_with_one_line(cross_pair, tmp_path, settings_restored,
                                                         monkeypatch, capsys):
    teacher, student = cross_pair
    s_tok = load_tokenizer(student)
    script = [([400, 401] + s_tok.encode_text("12"), "length")]
    code, _, err = run_distill(settings_restored.main, monkeypatch, capsys, script,
                               tmp_path / "o", cross_pair)
    assert code == 1
    assert err[-1] == ("error: step 0: 8 of 8 rollouts have no text the teacher's tokenizer reads "
                       "as the student wrote it (more than max_unaligned_share=0.5): this pair of "
                       "tokenizers does not fit")
    assert not os.path.exists(tmp_path / "o" / "log.jsonl")
