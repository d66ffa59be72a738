"""The GPU path, where a GPU is visible (skipped otherwise): one-rank NCCL training runs, model.py's
bf16 error against transformers' own, the torch sampler on CUDA; with two GPUs, two-rank NCCL runs
against one (test_scale.py runs the same checks on CPU with gloo). NCCL cannot put two ranks on one
GPU, so the CPU tests ask for device=cpu."""

import math
import os
import shutil
import sys

import pytest
import torch
from conftest import make_checkpoint
from test_distill import FIXTURE, RANKS, TORCHRUN, log, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason="needs 2 GPUs: NCCL puts one rank on each")
ONE_RANK = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]


@pytest.fixture(scope="module")
def gpu_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_pair")
    wide = make_checkpoint(root / "wide", "qwen3", hidden_size=96, num_attention_heads=3, seed=5)
    teacher = make_checkpoint(root / "teacher", "qwen3", seed=3)
    student = make_checkpoint(root / "student", "qwen3", seed=4)
    return teacher, student, wide


def gpu_args(teacher, student, out, **kw):
    a = dict(student=student, teacher=teacher, out_dir=str(out), prompts=FIXTURE, backend="torch",
             device="cuda", prompts_per_step=4, n_samples=2, max_new_tokens=8, max_prompt_len=256,
             layers="all", positions="last_k", k_positions=4, max_steps=2, micro_batch_size=3,
             lr=1e-3, warmup_frac=0.0, save_every=100, topk=4)
    a.update(kw)
    return [f"--{k}={v}" for k, v in a.items()]


@pytest.mark.parametrize("launch,method,extra", [("torchrun", "oprd", {}),
                                                 ("python", "opd_topk", {}),
                                                 ("python", "oprd", {"projector": True})])
def test_one_rank_nccl_runs(gpu_pair, tmp_path, launch, method, extra):
    """NCCL, FSDP2 in bf16 and fused AdamW, under torchrun and as one plain process (which must
    train the same way: next test); the projector's parameters share fused AdamW with the model's
    DTensors."""
    teacher, student, wide = gpu_pair
    out = tmp_path / "out"
    cmd = (ONE_RANK if launch == "torchrun" else [sys.executable]) + ["distill.py"]
    run(cmd + gpu_args(wide if extra else teacher, student, out, method=method, **extra))
    rows = log(out)
    assert [r["step"] for r in rows] == [0, 1] and all(r["grad_norm"] > 0 for r in rows)
    assert all(math.isfinite(r["loss"]) and r["update_transient_mem_mb"] > 0 for r in rows)
    assert os.path.isdir(out / "step_0000002")


def test_one_process_and_one_rank_torchrun_train_alike(gpu_pair, tmp_path):
    """The same bf16 step twice, launched two ways: equal to 1e-4. bf16 rounds at 2^-8 = 4e-3, so a
    launch that silently computed in another precision (or another mixed-precision policy) is ~40x
    outside it."""
    teacher, student, _ = gpu_pair
    common = dict(method="opd_topk+oprd", temperature=0.0, max_steps=2)
    run(ONE_RANK + ["distill.py"] + gpu_args(teacher, student, tmp_path / "a", **common))
    run([sys.executable, "distill.py"] + gpu_args(teacher, student, tmp_path / "b", **common))
    for a, b in zip(log(tmp_path / "a"), log(tmp_path / "b")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


# ----------------------------------------------------------------------------- two GPUs

# 3 greedy rollouts a step, dealt 1 + 2 over the ranks (different token counts; the short rank pads)
UNEVEN = dict(method="opd_topk+oprd", mu=10.0, temperature=0.0, prompts_per_step=3, n_samples=1,
              micro_batch_size=1, max_steps=3, save_every=1, keep_checkpoints=3)


def close_in_bf16(a, b):
    """Two runs of one bf16 step on other shardings: each sequence is its own micro-batch on both,
    so the forwards agree; the gradients are summed in another order (fp32 reduction of bf16
    products)."""
    assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-2)


@two_gpus
def test_two_gpus_uneven_shares_equal_one_and_resume(gpu_pair, tmp_path):
    teacher, student, _ = gpu_pair
    run(RANKS + [str(tmp_path / "rec")] + gpu_args(teacher, student, tmp_path / "w2", **UNEVEN))
    run([sys.executable, "distill.py"] + gpu_args(teacher, student, tmp_path / "w1", **UNEVEN))
    a, b = (torch.load(tmp_path / "rec" / f"rank{r}.pt", weights_only=False)["steps"][0]
            for r in (0, 1))
    assert a["local_out"] != b["local_out"] and a["local_micro"] != b["local_micro"]
    w2, w1 = log(tmp_path / "w2"), log(tmp_path / "w1")
    close_in_bf16(w2[0], w1[0])
    # after one update: bf16's steps apart
    assert w2[1]["loss"] == pytest.approx(w1[1]["loss"], rel=2e-2)
    # resume the two-rank run at step 2: the same step as the run that never stopped (same sharding:
    # 1e-4)
    os.makedirs(tmp_path / "cut")
    shutil.copytree(tmp_path / "w2" / "step_0000002", tmp_path / "cut" / "step_0000002")
    resume_args = gpu_args(teacher, student, tmp_path / "cut", init_from="resume", **UNEVEN)
    run(TORCHRUN + ["distill.py"] + resume_args)
    resumed = log(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [2]
    assert resumed[0]["loss"] == pytest.approx(w2[2]["loss"], rel=1e-4)
    assert resumed[0]["grad_norm"] == pytest.approx(w2[2]["grad_norm"], rel=1e-3)


def relative_error(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


def test_bf16_error_matches_transformers(tmp_path):
    """model.py in bf16 against the same weights in fp32 (transformers, fp32, is the reference): its
    relative logit error must stay within 1.1x of transformers' own bf16 error (on the H200 at the
    1.5B shape: 3.81% both)."""
    from transformers import AutoModelForCausalLM
    from model import Transformer
    path = make_checkpoint(tmp_path / "m", "qwen2", tokenizer=False, hidden_size=512,
                           intermediate_size=1536, num_hidden_layers=8, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=128, vocab_size=4096, seed=0)
    idx = torch.randint(0, 4096, (2, 512), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        hf32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda()
        ref = hf32(idx).logits.float()
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()(idx).logits
        ours = Transformer.from_pretrained(path, dtype=torch.bfloat16, device="cuda")(idx)
        ours32 = Transformer.from_pretrained(path, dtype=torch.float32, device="cuda")(idx)
    assert relative_error(ours32, ref) < 1e-3  # fp32 on the GPU: the same model
    e_ours, e_hf = relative_error(ours, ref), relative_error(hf, ref)
    print(f"relative logit error in bf16: model.py {e_ours:.4%}, transformers {e_hf:.4%}")
    assert e_ours <= 1.1 * e_hf + 1e-4


def test_torch_sampler_on_cuda(tiny_qwen3):
    from rollout import TorchSampler
    s = TorchSampler(tiny_qwen3, device="cuda")
    assert s.device.type == "cuda"
    prompts = [[1, 2, 3, 4], [5, 6]]
    a = s.generate(prompts, n=3, temperature=1.0, max_new_tokens=16, seed=7)
    b = s.generate(prompts, n=3, temperature=1.0, max_new_tokens=16, seed=7)
    c = s.generate(prompts, n=3, temperature=1.0, max_new_tokens=16, seed=8)
    V = s.model.config.vocab_size
    # seeded: reproducible
    assert [[x.tokens for x in r] for r in a] == [[x.tokens for x in r] for r in b]
    assert [[x.tokens for x in r] for r in a] != [[x.tokens for x in r] for r in c]
    assert all(0 <= t < V and len(x.tokens) <= 16 for r in a for x in r for t in x.tokens)
