"""
The on-policy sampler: prompts in, sampled responses out. distill.py (student rollouts) and eval.py
both generate through this file, with one interface and two backends:

- vLLM, the default wherever it imports and runs on the device asked for. One engine per training
  process (under torchrun one per rank, rollouts data-parallel across ranks; tensor parallelism
  settable), the share of accelerator memory settable, asleep (weights offloaded, KV cache freed)
  while the trainer updates. The engine runs in the training process, on one GPU as on eight, so
  `update_weights` hands it the student's new weights as tensors, in place, parameter by parameter,
  through vLLM internals that move between releases (requirements-gpu.txt pins one): a starting
  engine checks them and runs one weight sync, so a mismatch fails in the first minute, not after
  the first long rollout. It prints one line at start: device, dtype, and the model runner vLLM
  picked (on CUDA vLLM 0.32 takes its V2 runner; VLLM_USE_V2_MODEL_RUNNER=0 falls back to V1).
- torch: sampler.py's TorchSampler, batched sampling with model.py's KV cache, the same sampling
  semantics (stated at the top of sampling.py) and outputs. Used where vLLM is absent or built for
  another device.

    # tokenizer.py; or "byte": the built-in byte-level one
    tok = load_tokenizer("path/to/hf_dir")
    # n_tokens: the ids it may draw (never the embedding's padding rows past the tokenizer)
    sampler = make_sampler("auto", "path/to/hf_dir", gpu_memory_utilization=0.3,
                           n_tokens=tok.vocab_size)
    out = sampler.generate([tok.chat("What is 12 + 30?")], n=4, temperature=1.0,
                           max_new_tokens=256, stop_ids=tok.eos_ids, seed=step, logprobs=True)
    # prompt 0, sample 3
    out[0][3].tokens, out[0][3].finish, out[0][3].logprobs
    # on_sample=f: f(i, j, sample) as each finishes (distill.py starts a rollout's alignment to the
    # teacher there)
    sampler.sleep()
    ...train step...
    # the vLLM sampler's dtype: each rank's shard is cast before the all-gather; update_weights
    # wakes a sleeping engine itself
    sampler.update_weights(fsdp_named_tensors(model, dtype=sampler.dtype))

$ python rollout.py path/to/hf_dir "What is 12 + 30?"          # a quick look, default backend
$ python rollout.py path/to/hf_dir "What is 12 + 30?" torch    # the torch backend (-h: usage)

Neither backend draws an id the tokenizer does not have (checkpoints pad their embedding past it:
Qwen2.5 has 151,936 rows for 151,665 tokens). Given the tokenizer's size, n_tokens, the torch
sampler samples from the logits' first n_tokens columns (a view: nothing is copied), and vLLM gets a
logit bias of -inf on the padding rows (an indexed add over those few hundred ids per step). The
log-probs stay raw, over every row, as the trainer computes them.

dtypes: checkpoints are saved in fp32. On a GPU both backends sample in bf16 unless given a dtype
(vLLM's own 'auto' would pick fp16 or bf16 depending on its version); on a CPU in the checkpoint's
dtype.
"""

import sys
from typing import Iterator

import torch

from model import check_checkpoint
from sampler import TorchSampler
from tokenizer import load_tokenizer
# vLLM's own logging is set before vLLM is imported
from vllm_sampler import VLLMSampler, VLLMVersionError, vllm_device_type

VLLM_ONLY = ("tensor_parallel_size", "enable_sleep_mode", "seed", "max_model_len", "enforce_eager",
             "max_num_seqs", "bucket_mb", "own_world")
TORCH_ONLY = ("sync_every", "decode")
BACKENDS = ("auto", "vllm", "torch")


def make_sampler(backend="auto", model_path=None, model=None, **engine_kw):
    """backend 'auto' (vLLM if it imports and runs on engine_kw's device, else torch) | 'vllm' |
    'torch'.

    vllm: the engine loads model_path (model= is not used); engine_kw are vLLM's LLM(...)
    arguments: gpu_memory_utilization, tensor_parallel_size, enable_sleep_mode, seed,
    max_model_len, max_num_seqs, dtype, enforce_eager, ...; device (default: the one vLLM's build
    runs on); bucket_mb sets the weight-sync bucket; own_world=True starts an engine apart from
    the torch.distributed world, under torchrun, where other ranks start none (distill.py's
    sampler ranks). The torch-only sync_every and decode are ignored.
    torch: model= an in-memory Transformer to sample from (shared, not copied: update_weights is
    then a copy onto itself, i.e. nothing), else one is loaded from model_path; dtype, device,
    gpu_memory_utilization, sync_every, decode; the vLLM-only options (VLLM_ONLY) are ignored, so
    one config serves both backends.
    Both: n_tokens, the tokenizer's size (ids past it, an embedding's padding rows, are never
    drawn; None draws from every row); dp_rank, the data-parallel rank mixed into every seed
    (default: this process's rank, over its tensor-parallel group for vLLM; distill.py's sampler
    ranks pass their index among the sampler ranks).
    A model_path is checked (check_checkpoint) before any engine starts; backend is checked where
    it is read (distill.py's and eval.py's settings, the CLI below).
    """
    if model_path is not None and (backend != "torch" or model is None):
        model_path = check_checkpoint(model_path)[0]
    if backend == "auto":
        runs_on = vllm_device_type()
        wanted = engine_kw.get("device")
        on_its_device = wanted is None or torch.device(wanted).type == runs_on
        backend = "vllm" if runs_on and on_its_device else "torch"
    if backend == "vllm":
        if model_path is None:
            raise ValueError("the vLLM backend loads the model itself: give model_path (an HF "
                             "checkpoint folder)")
        vllm_kw = {k: v for k, v in engine_kw.items() if k not in TORCH_ONLY}
        return VLLMSampler(model_path, **vllm_kw)
    torch_kw = {k: v for k, v in engine_kw.items() if k not in VLLM_ONLY}
    return TorchSampler(model_path, model=model, **torch_kw)


def vllm_available():
    return vllm_device_type() is not None


def synced_parameters(model) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters a weight sync sends, as (HF name, parameter): wrapper prefixes
    (torch.compile's _orig_mod., activation checkpointing's, DDP's module.) removed, a tied lm_head
    skipped (checkpoints store only the embedding)."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, p in model.named_parameters():
        name = name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
        name = name.removeprefix("module.")
        if tied and name == "lm_head.weight":
            continue
        yield name, p


def fsdp_named_tensors(model, dtype=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream a model's parameters (synced_parameters) as (HF name, full tensor), one at a time,
    for update_weights.

    For an FSDP2-sharded model each DTensor is all-gathered on its own (full_tensor(), a collective:
    every rank of its mesh must iterate), so no rank ever holds a second full copy of the model.
    Plain tensors, and the shards of a one-rank mesh, pass through as they are (views of the live
    weights: copy what must outlive the next step).

    dtype: the engine's (the vLLM sampler's .dtype; bf16 on a GPU). Each rank casts its own shard
    before the all-gather, so the gather moves and holds half the bytes of the fp32 master weights
    (7.1 GB per rank per step on the paper's job otherwise); the result is exactly the cast of the
    full tensor. None keeps the model's dtype.
    """
    for name, p in synced_parameters(model):
        t = p.detach()
        if dtype is not None:
            # on a DTensor an elementwise cast of the local shard: the placements stay
            t = t.to(dtype)
        # a DTensor; on a one-rank mesh its local shard is the whole tensor
        if hasattr(t, "full_tensor"):
            t = t.to_local() if t.device_mesh.size() == 1 else t.full_tensor()
        yield name, t


# ----------------------------------------------------------------------------- a quick look

USAGE = """usage: python rollout.py <hf_checkpoint_dir> <prompt> [auto|vllm|torch]

Samples one answer to <prompt> (rendered with the checkpoint's chat template; temperature 0.7,
top-p 0.95, up to 512 new tokens) with the given backend (default auto: vLLM if it imports, else
torch)."""


def main(argv):
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return
    if len(argv) not in (2, 3):
        print(USAGE.splitlines()[0], file=sys.stderr)
        sys.exit(2)
    path = argv[0]
    prompt = argv[1]
    backend = argv[2] if len(argv) > 2 else "auto"
    # a bad path, checkpoint, backend or vLLM: one line, no traceback
    try:
        if backend not in BACKENDS:
            raise ValueError(f"unknown sampler backend {backend!r}: expected 'auto', 'vllm' or "
                             "'torch'")
        path = check_checkpoint(path)[0]
        tok = load_tokenizer(path)
        ids = tok.chat(prompt)
        sampler = make_sampler(backend, path, n_tokens=tok.vocab_size)
    # CheckpointError is a ValueError; no chat template: OSError
    except (ValueError, OSError, VLLMVersionError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    s = sampler.generate([ids], temperature=0.7, top_p=0.95, max_new_tokens=512,
                         stop_ids=tok.eos_ids)[0][0]
    print(f"[{type(sampler).__name__}, {len(s.tokens)} tokens, finish={s.finish}]\n"
          f"{tok.decode(s.tokens)}")
    sampler.close()


if __name__ == "__main__":
    main(sys.argv[1:])
