"""lab/bench.py: the FLOP count, the paper-shape update path (FSDP2 on a one-rank group) at a toy
shape on CPU, the peer section's tokenizer, floors and eager costs, and the peer section without TRL
(one line; the other sections still run)."""

import json
import math
import sys

import pytest
import torch

from lab import bench
import data
from lab import peer
from losses import make_plan
from model import ModelConfig, to_hf_config
from tokenizer import load_tokenizer

TOY = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
           tie_word_embeddings=False)


@pytest.fixture
def one_thread():
    """Toy matmuls on cores shared with other jobs: threads would wait on each other. Restored
    after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_body_to_head_ratio():
    # Qwen2.5-1.5B: 28 x 46.8M block weights over a 1536 x 151,936 head
    assert bench.body_to_head(bench.QWEN_1P5B) == pytest.approx(5.61, abs=0.01)
    paper_proportioned = bench.CPU_SHAPES["paper-proportioned"]
    assert bench.body_to_head(paper_proportioned) == pytest.approx(5.6, rel=0.01)
    assert bench.body_to_head(bench.CPU_SHAPES["head-dominated"]) < 0.1
    # attention adds 4 * T^2 * d / 2 per layer: at 16,896 tokens the blocks weigh ~8.7x the head
    assert bench.body_to_head(bench.QWEN_1P5B, 16896) == pytest.approx(8.73, abs=0.01)


def test_update_flops_by_hand():
    c = ModelConfig(**bench.QWEN_1P5B)
    T, rows = 512 + 16384, 16384
    block = 1536 * (1536 + 2 * 256) + 1536 * 1536 + 3 * 1536 * 8960
    # weights, and causal attention: 4 * T^2 * d / 2
    per_block = 2 * block * T + 4 * 1536 * T * (T + 1) // 2
    fwd_blocks = 28 * per_block
    head = 2 * 1536 * 151936 * rows
    oprd, oprd_hw = bench.update_flops(make_plan("oprd", c, c), c, c, 1, T, rows,
                                       checkpointing=True)
    assert oprd == 4 * fwd_blocks and oprd_hw == 5 * fwd_blocks  # no LM head anywhere
    topk, topk_hw = bench.update_flops(make_plan("opd_topk", c, c), c, c, 1, T, rows,
                                       checkpointing=True)
    assert topk == 4 * (fwd_blocks + head) and topk_hw == topk + fwd_blocks + 2 * head
    full, full_hw = bench.update_flops(make_plan("opd_full", c, c), c, c, 1, T, rows,
                                       checkpointing=True)
    # its gradient made in the forward pass: no head again
    assert full == topk and full_hw == full + fwd_blocks
    # OPRD on layer 4 only: the teacher stops after block 4; the student runs to its final norm
    # (distill.py re-scores a sample of the rollout's tokens with it, the sampler check), with no LM
    # head counted
    layer_4 = bench.update_flops(make_plan("oprd", c, c, layers="4"), c, c, 1, T, rows, False)[0]
    assert layer_4 == (4 + 3 * 28) * per_block


def test_update_table_toy_shape_cpu(one_thread):
    """The GPU section's code path (random models, one-rank process group, FSDP2, activation
    checkpointing, every method chunked and in one chunk) at a toy shape on CPU."""
    res = bench.update_table(TOY, 1, 16, 64, torch.device("cpu"), repeats=1, peak_tflops=1.0)
    bench.add_ratios(res)
    assert not torch.distributed.is_initialized()  # the one-rank group is gone again
    assert set(res["methods"]) == set(bench.UPDATE_METHODS)
    for m, by in res["methods"].items():
        assert set(by) == {"chunked", "one_chunk"}
        for setting, r in by.items():
            assert "error" not in r, (m, setting, r)
            for k in ("seconds", "transient_mb", "tokens_per_s", "tflops", "mfu", "hfu",
                      "model_tflop"):
                assert math.isfinite(r[k]) and r[k] >= 0, (m, setting, k, r[k])
            assert r["seconds"] > 0 and r["mfu"] > 0
        assert by["one_chunk"]["vocab_chunk_tokens"] == 64
    oprd_tflop = res["methods"]["oprd"]["chunked"]["model_tflop"]
    assert oprd_tflop < res["methods"]["opd_topk"]["chunked"]["model_tflop"]
    for suffix in ("", "_one_chunk"):
        assert math.isfinite(res["oprd_speedup_vs_topk" + suffix])
        # in this process (other tests ran first) top-16's resident-set peak can be 0: then there is
        # no memory ratio
        topk_setting = "chunked" if not suffix else "one_chunk"
        base_mb = res["methods"]["opd_topk"][topk_setting]["transient_mb"]
        assert (res["oprd_mem_ratio_vs_topk" + suffix] is None) == (base_mb == 0)


def test_peer_tokenizer_is_bytes_plus_three_with_chatml(tmp_path):
    """Both trainers read the pair's tokenizer files: byte b is token b + 3, <|im_start|> 259,
    <|im_end|> 1 (the stop token); what distill.py's tokenizer renders is what TRL's
    apply_chat_template gives."""
    from transformers import AutoTokenizer
    peer.peer_tokenizer(tmp_path)
    tok, hf = load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(tmp_path)
    text = "37+48-29=?"
    by_hand = ([259] + [b + 3 for b in f"user\n{text}".encode()] + [1, 10 + 3, 259]
               + [b + 3 for b in b"assistant\n"])
    assert tok.chat(text) == by_hand
    messages = [{"role": "user", "content": text}]
    rendered = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert list(rendered["input_ids"]) == by_hand
    assert (tok.encode("é ✓") == [b + 3 for b in "é ✓".encode()]
            and tok.decode(tok.encode("é ✓")) == "é ✓")
    assert tok.eos_ids == [1] and tok.pad_id == 0


def test_peer_floor_counts_the_decode_steps_by_hand(tmp_path, one_thread):
    """The floors' FLOPs by hand. Each of the rollout's decode steps runs 8 rows through the
    student's 2 blocks (q, k, v, o, gate, up, down, one attention pair) and its LM head. The update:
    the teacher's 4 blocks over 8 x T tokens (causal pairs) and its head on the 8 x 60 response
    rows, and three times the student's 2 blocks and head."""
    peer.peer_tokenizer(tmp_path)
    d, q, kv, hidden, V = 128, 4 * 32, 2 * 32, 384, 512
    block = d * q + 2 * d * kv + q * d + 3 * d * hidden
    f = peer.floors(V, str(tmp_path), 60.0)
    # the chat template's
    prompts = [1 + len(f"user\n{data.build_prompt(p)}".encode()) + 3 + len(b"assistant\n")
               for p in data.load_problems("tiny_train")[:8]]
    T = round(sum(prompts) / 8 + 60)
    assert f["length"] == T

    def forward(blocks, tokens, pairs, rows):
        return blocks * (2 * block * tokens + 4 * q * pairs) + 2 * d * V * rows

    assert f["decode_gflop"] * 1e9 == pytest.approx(60 * forward(2, 8, 8, 8), rel=1e-12)
    pairs = 8 * T * (T + 1) // 2
    update = forward(4, 8 * T, pairs, 480) + 3 * forward(2, 8 * T, pairs, 480)
    assert f["update_gflop"] * 1e9 == pytest.approx(update, rel=1e-12)
    assert f["decode_seconds"] == pytest.approx(f["decode_gflop"] / f["gflop_s"][8], rel=1e-9)
    assert f["update_seconds"] == pytest.approx(f["update_gflop"] / f["gflop_s"][8 * T], rel=1e-9)


def test_peer_eager_costs_time_the_same_work(tmp_path, one_thread):
    """The dispatch count per decode step: the average over a whole rollout equals one step's count,
    taken here as the calls of a 3-token generate less those of a 2-token one. FSDP2 at one rank
    against the plain module: both end with the same weights, bit for bit (so the difference is
    FSDP2's alone), and the step moved them."""
    from model import Transformer
    from sampler import TorchSampler
    shape = dict(peer.PEER_SHAPE, vocab_size=512, num_hidden_layers=2)
    model = bench.random_model(shape, bench.CPU)
    model.hf_config = dict(to_hf_config(model.config), eos_token_id=1, pad_token_id=0)
    model.save_pretrained(tmp_path)
    peer.peer_tokenizer(tmp_path)
    e = peer.eager_costs(str(tmp_path), 40, repeats=1)
    assert not torch.distributed.is_initialized()
    sampler, prompts = TorchSampler(model=model), peer.peer_prompts(str(tmp_path))
    counts = [peer.aten_calls(lambda: sampler.generate(prompts, max_new_tokens=k, stop_ids=[]))
              for k in (2, 3)]
    per_step = counts[1] - counts[0]
    assert per_step > 100 and e["decode_ops"] == pytest.approx(per_step, rel=0.01)
    assert e["decode_seconds"] > 0 and e["plain_seconds"] > 0 and e["fsdp2_seconds"] > 0
    start = Transformer.from_pretrained(str(tmp_path)).state_dict()
    plain, sharded = e["plain_weights"], e["fsdp2_weights"]
    assert plain.keys() == sharded.keys() and all(torch.equal(plain[k], sharded[k]) for k in plain)
    up = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(plain[up], start[up])


def test_peer_without_trl_is_one_line_and_the_other_sections_run(tmp_path, monkeypatch, capsys,
                                                                  one_thread):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl fails, as where it is not installed
    out = tmp_path / "bench.json"
    bench.main(["--sections=peer,forward", "--device=cpu", "--repeats=1", f"--json={out}"])
    printed = capsys.readouterr().out
    skipped = [line for line in printed.splitlines() if line.startswith("peer:")]
    assert skipped == ['peer: skipped, TRL is not installed (no dependency of this project): '
                       f'pip install trl=={peer.TRL_VERSION} "datasets<5"']
    results = json.loads(out.read_text())
    assert results["peer"] == {"skipped": skipped[0]}
    assert results["forward"]["ours_over_hf"] > 0 and results["forward"]["taps_over_logits"] > 0


def test_variance_runs_on_a_tiny_pair(tmp_path, monkeypatch, one_thread):
    """The variance section on a pair shaped like tiny.py's (random weights, the byte tokenizer):
    every method's relative variance is a finite positive number; without the pair it is one clear
    error."""
    import tiny
    monkeypatch.setattr(tiny, "MODELS", str(tmp_path / "models"))
    with pytest.raises(FileNotFoundError, match="python tiny.py --remake=True"):
        bench.bench_variance(dict(bench.CONFIG, variance_rollouts=2), torch.device("cpu"))
    for seed, who in enumerate(("teacher", "student")):
        tiny.make_init(str(tmp_path / "models" / who), seed=seed, **tiny.SHAPES["student"])
    res = bench.bench_variance(dict(bench.CONFIG, variance_rollouts=3), torch.device("cpu"))
    assert set(res["methods"]) == set(bench.VARIANCE_METHODS)
    for r in res["methods"].values():
        assert math.isfinite(r["relative_variance"]) and r["relative_variance"] > 0


def test_align_section_counts_the_chunks_both_tokenizers_read(tmp_path, one_thread):
    """The align section's rollout of 600 byte tokens: its chunk count is the number of byte offsets
    where a token of the tiny BPE teacher ends (counted here from its decoded pieces), since every
    byte is a student token."""
    import data
    import tiny
    res = (bench.main(["--sections=align", "--device=cpu", "--repeats=1", "--response_len=600",
                       f"--json={tmp_path / 'b.json'}"])
           or json.loads((tmp_path / "b.json").read_text())["align"])
    tiny.make_bpe_tokenizer(tmp_path / "bpe")
    tok = load_tokenizer(str(tmp_path / "bpe"))
    solutions = "\n".join(p["solution"] for p in data.load_problems("tiny_train")[:30])
    text = solutions.encode()[:600].decode()
    ends, at = set(), 0
    for i in tok.encode(text):
        at += len(tok.decode([i]).encode())
        ends.add(at)
    assert res["response_tokens"] == 600 and res["chunks"] == len(ends) < 600
    align_share = res["align_seconds"] / res["update_seconds"]
    assert 0 < res["fraction_of_update"] == pytest.approx(align_share)
    beside_share = res["beside_seconds"] / res["update_seconds"]
    assert 0 < res["beside_fraction"] == pytest.approx(beside_share)



def test_overlap_bound_and_contention_by_hand():
    from lab import overlap
    # sampling 0.4 s alone on 1 thread and 0.3 s on 2; training 0.8 s and 0.5 s
    wide = {"time/step": 0.8, "sampling": 0.3, "training": 0.5}
    narrow = {"time/step": 1.2, "sampling": 0.4, "training": 0.8, "time/teacher": 0.2,
              "time/student": 0.55, "time/optimizer": 0.05}
    bound = overlap.overlap_bound(wide, narrow)
    assert bound["sampling_speedup"] == pytest.approx(0.4 / 0.3)
    assert bound["training_speedup"] == pytest.approx(0.8 / 0.5)
    # the split step is the slower side on one thread, the training
    assert bound["here"] == pytest.approx(0.8 / 0.8)
    # balanced: both sides x s on one thread, colocated x / (4/3) + x / 1.6
    assert bound["balanced"] == pytest.approx(0.75 + 0.625)
    split = {"time/teacher": 0.25, "time/student": 0.6, "time/optimizer": 0.05,
             "sampler/sample_s": 0.5}
    slower = overlap.contention(split, narrow)
    assert slower["training"] == pytest.approx(0.9 / 0.8)
    assert slower["sampling"] == pytest.approx(0.5 / 0.4)


def test_async_section_pools_its_rounds_by_hand(monkeypatch, capsys):
    """Fake runs (each timed_run's records known): two rounds of the three runs, each figure the
    median of both rounds' steps after the warm-up, the ratio and the bound from those."""
    from lab import overlap
    calls = []

    def fake_run(ranks, threads, steps, extra):
        calls.append((ranks, threads, extra))
        step = {(1, 2): 1.0, (1, 1): 1.5, (2, 1): 0.8}[ranks, threads] * len(calls)
        parts = {k: 0.0 for k in overlap.PARTS}
        record = dict(parts, **{"time/step": step, "time/rollout": step / 4,
                                "time/student": step / 2, "sampler/sample_s": step / 5,
                                "sampler/wait_s": 0.01})
        # the warm-up steps are slower, and left out
        return [dict(record, **{"time/step": 99.0})] * overlap.WARM_UP_STEPS + [record] * 3
    monkeypatch.setattr(overlap, "timed_run", fake_run)
    res = overlap.workload(threads=2, steps=5, rounds=2, prompts_per_step=4)
    assert [c[:2] for c in calls] == [(1, 2), (1, 1), (2, 1)] * 2
    assert all("--prompts_per_step=4" in c[2] for c in calls)
    assert "--rollout_ranks=1" in calls[2][2] and "--off_policy_steps=0" in calls[0][2]
    # run i of the six made steps of (its base) x i: each median is over 3 + 3 steps of two values
    colocated = (1.0 * 1 + 1.0 * 4) / 2
    narrow = (1.5 * 2 + 1.5 * 5) / 2
    split = (0.8 * 3 + 0.8 * 6) / 2
    assert res["colocated"]["time/step"] == pytest.approx(colocated)
    assert res["colocated"]["sampling"] == pytest.approx(colocated / 4)
    assert res["colocated"]["training"] == pytest.approx(colocated * 3 / 4)
    assert res["speedup"] == pytest.approx(colocated / split)
    assert res["bound"]["sampling_speedup"] == pytest.approx(narrow / colocated)
    assert res["contention"]["training"] == pytest.approx(split / narrow)
    assert res["contention"]["sampling"] == pytest.approx((split / 5) / (narrow / 4))
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_a_split_run_logs_what_the_async_section_reads():
    """The split run of the section (1 trainer + 1 sampler rank of the shipped pair), small: every
    step's record has the parts and the sampler's figures the section takes medians of."""
    from lab import overlap
    records = overlap.timed_run(2, 1, 3, ["--rollout_ranks=1", "--prompts_per_step=2",
                                          "--max_new_tokens=8"])
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert all(r[k] >= 0 for k in overlap.PARTS) and r["time/step"] > 0
        assert r["sampler/sample_s"] > 0 and r["sampler/wait_s"] >= 0
