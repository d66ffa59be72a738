"""bench.py: the FLOP count, and the paper-shape update path (FSDP2 on a one-rank group) at a toy shape on CPU."""

import math

import pytest
import torch

import bench
from distill import make_plan
from model import ModelConfig

TOY = dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)


def test_body_to_head_ratio():
    # Qwen2.5-1.5B: 28 x 46.8M block weights over a 1536 x 151,936 head
    assert bench.body_to_head(bench.QWEN_1P5B) == pytest.approx(5.61, abs=0.01)
    assert bench.body_to_head(bench.CPU_SHAPES["paper-proportioned"]) == pytest.approx(5.6, rel=0.01)
    assert bench.body_to_head(bench.CPU_SHAPES["head-dominated"]) < 0.1
    # attention adds 4 * T^2 * d / 2 per layer: at 16,896 tokens the blocks weigh ~8.7x the head
    assert bench.body_to_head(bench.QWEN_1P5B, 16896) == pytest.approx(8.73, abs=0.01)


def test_update_flops_by_hand():
    c = ModelConfig(**bench.QWEN_1P5B)
    T, rows = 512 + 16384, 16384
    block = 1536 * (1536 + 2 * 256) + 1536 * 1536 + 3 * 1536 * 8960
    per_block = 2 * block * T + 4 * 1536 * T * (T + 1) // 2  # weights, and causal attention: 4 * T^2 * d / 2
    fwd_blocks = 28 * per_block
    head = 2 * 1536 * 151936 * rows
    oprd, oprd_hw = bench.update_flops(make_plan("oprd", c, c), c, c, 1, T, rows, checkpointing=True)
    assert oprd == 4 * fwd_blocks and oprd_hw == 5 * fwd_blocks  # no LM head anywhere
    topk, topk_hw = bench.update_flops(make_plan("opd_topk", c, c), c, c, 1, T, rows, checkpointing=True)
    assert topk == 4 * (fwd_blocks + head) and topk_hw == topk + fwd_blocks + 2 * head
    # OPRD on layer 4 only: teacher and student stop after block 4
    assert bench.update_flops(make_plan("oprd", c, c, layers="4"), c, c, 1, T, rows, False)[0] == 4 * 4 * per_block


def test_update_table_toy_shape_cpu():
    """The GPU section's code path (random models, one-rank process group, FSDP2, activation checkpointing,
    every method chunked and in one chunk) at a toy shape on CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # toy matmuls on cores shared with other jobs: threads would wait on each other
    try:
        res = bench.update_table(TOY, 1, 16, 64, torch.device("cpu"), repeats=1, peak_tflops=1.0)
    finally:
        torch.set_num_threads(threads)
    bench.add_ratios(res)
    assert not torch.distributed.is_initialized()  # the one-rank group is gone again
    assert set(res["methods"]) == set(bench.UPDATE_METHODS)
    for m, by in res["methods"].items():
        assert set(by) == {"chunked", "one_chunk"}
        for setting, r in by.items():
            assert "error" not in r, (m, setting, r)
            for k in ("seconds", "transient_mb", "tokens_per_s", "tflops", "mfu", "hfu", "model_tflop"):
                assert math.isfinite(r[k]) and r[k] >= 0, (m, setting, k, r[k])
            assert r["seconds"] > 0 and r["mfu"] > 0
        assert by["one_chunk"]["vocab_chunk_tokens"] == 64
    assert res["methods"]["oprd"]["chunked"]["model_tflop"] < res["methods"]["opd_topk"]["chunked"]["model_tflop"]
    assert math.isfinite(res["oprd_speedup_vs_topk"])
    # in this process (other tests ran first) top-16's resident-set peak can be 0: then there is no memory ratio
    base_mb = res["methods"]["opd_topk"]["chunked"]["transient_mb"]
    assert (res["oprd_mem_ratio_vs_topk"] is None) == (base_mb == 0)
    assert base_mb == 0 or math.isfinite(res["oprd_mem_ratio_vs_topk"])
