"""OPRD across tokenizers (align.py wired into distill.py): the teacher reads its own ids. A teacher
whose tokenizer numbers the same tokens differently, with its embedding and head rows moved to
match, is the same function of the text: trained against it, the student must see exactly the losses
it sees against the teacher before the move. A teacher fed the student's ids would read other tokens
and give other losses. Both teachers carry one more special token than the student, so both runs
take the cross-tokenizer path (the student's sampled tokens are not always the teacher tokenizer's
own encoding of their text, so chunks can span several tokens even here)."""

import json
import os
import shutil

import pytest
import torch
from conftest import ROOT, make_checkpoint
from safetensors.torch import load_file, save_file

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "mini_bench.jsonl")


def permuted_copy(src, dst, seed=0):
    """src with its tokenizer's ids permuted (special tokens kept) and its embedding and LM-head
    rows with them."""
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "tokenizer.json")) as f:
        spec = json.load(f)
    vocab = spec["model"]["vocab"]
    special = {t["id"] for t in spec["added_tokens"]}
    movable = sorted(i for i in vocab.values() if i not in special)
    order = torch.randperm(len(movable), generator=torch.Generator().manual_seed(seed)).tolist()
    new_id = {old: movable[order[k]] for k, old in enumerate(movable)}
    spec["model"]["vocab"] = {t: new_id.get(i, i) for t, i in vocab.items()}
    with open(os.path.join(dst, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    weights = load_file(os.path.join(dst, "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = weights[name].clone()
        for old, new in new_id.items():
            w[new] = weights[name][old]
        weights[name] = w
    save_file(weights, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst), new_id


def with_extra_special_token(folder):
    """One more special token, never in any text: the tokenizer maps text to the same ids but is
    not the same."""
    with open(os.path.join(folder, "tokenizer.json")) as f:
        spec = json.load(f)
    n = max(t["id"] for t in spec["added_tokens"]) + 1
    spec["added_tokens"].append(dict(id=n, content="<|extra|>", single_word=False, lstrip=False,
                                     rstrip=False, normalized=False, special=True))
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(spec, f)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    teacher = with_extra_special_token(make_checkpoint(root / "teacher", "qwen3", seed=3))
    student = make_checkpoint(root / "student", "qwen3", seed=4)
    permuted, new_id = permuted_copy(teacher, root / "teacher_permuted")
    return teacher, permuted, student, new_id


def distill(main, monkeypatch, capsys, out, teacher, student, **kw):
    """distill.main() in this process (main: settings_restored's); returns
    (exit status, stderr lines)."""
    from test_bad_input import main_in_process
    args = dict(student=student, teacher=teacher, out_dir=str(out), prompts=FIXTURE,
                backend="torch", device="cpu", prompts_per_step=4, n_samples=2, max_new_tokens=10,
                max_prompt_len=256, layers="all", positions="last_k", k_positions=4, max_steps=2,
                micro_batch_size=3, lr=1e-3, warmup_frac=0.0, seed=0)
    args.update(kw)
    argv = ["distill.py"] + [f"--{k}={v}" for k, v in args.items()]
    code, _, err = main_in_process(main, argv, monkeypatch, capsys)
    return code, err


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_the_permuted_teacher_is_the_same_function_of_the_text(models):
    teacher, permuted, _, new_id = models
    from model import Transformer
    from tokenizer import load_tokenizer, same_tokenization
    a, b = load_tokenizer(teacher), load_tokenizer(permuted)
    text = "What is 12 + 30? The answer is \\boxed{42}."
    assert not same_tokenization(a, b) and a.encode(text) != b.encode(text)
    assert [new_id.get(i, i) for i in a.encode(text)] == b.encode(text)
    with torch.no_grad():
        ha = Transformer.from_pretrained(teacher)(torch.tensor([a.encode(text)]), taps=[1, 3])
        hb = Transformer.from_pretrained(permuted)(torch.tensor([b.encode(text)]), taps=[1, 3])
        wrong = Transformer.from_pretrained(permuted)(torch.tensor([a.encode(text)]), taps=[1, 3])
    torch.testing.assert_close(ha[3], hb[3], atol=0, rtol=0)
    # the student's ids mean other tokens to this teacher
    assert (ha[3] - wrong[3]).abs().max() > 0.1


@pytest.mark.parametrize("extra", [dict(positions="last_k"), dict(align="token", positions="all"),
                                   dict(method="opd_chunk+oprd", mu=2.0)])
def test_oprd_against_the_permuted_teacher_equals_the_teacher_before(
        models, tmp_path, extra, settings_restored, monkeypatch, capsys):
    teacher, permuted, student, _ = models
    from tokenizer import load_tokenizer, same_tokenization
    assert not same_tokenization(load_tokenizer(teacher), load_tokenizer(student))
    run = (settings_restored.main, monkeypatch, capsys)
    before = distill(*run, tmp_path / "before", teacher, student, **extra)
    moved = distill(*run, tmp_path / "moved", permuted, student, **extra)
    assert before[0] == 0 and moved[0] == 0, (before[1][-20:], moved[1][-20:])
    assert losses(tmp_path / "moved") == pytest.approx(losses(tmp_path / "before"), rel=1e-6,
                                                       abs=1e-9)
    assert all(loss != 0 for loss in losses(tmp_path / "before"))  # chunks were compared


def test_output_space_methods_refuse_another_tokenizer(models, tmp_path, settings_restored,
                                                       monkeypatch, capsys):
    _, permuted, student, _ = models
    code, err = distill(settings_restored.main, monkeypatch, capsys, tmp_path / "o", permuted,
                        student, method="opd_topk")
    refusal = "method=opd_topk compares the two models' next-token"
    assert code == 1 and len(err) == 1 and refusal in err[0], err
    assert not os.path.exists(tmp_path / "o")


def test_each_rollout_is_aligned_beside_the_sampler_once(models, tmp_path, settings_restored,
                                                         monkeypatch, capsys):
    """Across tokenizers a rollout's alignment starts on the aligner's thread when the sampler hands
    it over (align.Aligner as generate's on_sample), and the micro-batches use that view:
    align.rollout_view runs once per rollout there, and on the main thread only for the zero-weight
    filler made before the first step."""
    import threading

    import align
    _, permuted, student, _ = models
    threads = []
    real = align.rollout_view

    def recording(*args, **kw):
        threads.append(threading.current_thread().name)
        return real(*args, **kw)
    monkeypatch.setattr(align, "rollout_view", recording)
    code, err = distill(settings_restored.main, monkeypatch, capsys, tmp_path / "o", permuted,
                        student)
    assert code == 0, err[-20:]
    # 2 steps of 4 prompts x 2 samples
    assert threads.count("MainThread") == 1 and len(threads) == 1 + 2 * 4 * 2
    assert all(name.startswith("align") for name in threads if name != "MainThread")
