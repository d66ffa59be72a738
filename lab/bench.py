"""
Benchmarks, one section each; every figure printed as measured and, with --json, written to a file
after each section. A failing section prints its error and the others still run. Ratios are to a
baseline of the same run; a timing is the best of `repeats` runs after a warm-up. Other work on the
cores hurts CPU figures (threads spin-wait on each other; --threads=1 suffers least), so the load
average is recorded.

# one H200: update, sampler, forward; about 4 minutes
$ python -m lab.bench --device=cuda --json=bench.json
# 2 busy cores: about 15 minutes
$ python -m lab.bench --sections=update --device=cpu --threads=1 --json=bench.json
# against TRL (pip install trl==1.16.0 "datasets<5" first)
$ python -m lab.bench --sections=peer --threads=1

- update: one update per method on one rollout (distill.py's, without the optimizer step): seconds,
  tokens/s, transient peak memory (peak during it minus memory at its start, the paper's Table 3),
  OPRD's ratios to top-16 OPD. Random weights, the student under FSDP2 on a one-rank group,
  activation checkpointing, all layers, the last 2000 positions. GPU: the paper's shape
  (Qwen2.5-1.5B, 512 + `response_len` tokens), bf16, logits in chunks of 1024 positions
  (distill.py's default) and in one (as a trainer that does not chunk), MFU. CPU: fp32, a process
  per method, "head-dominated" (Qwen's vocabulary on a d = 256 body) and "paper-proportioned"
  (body:head 5.6:1, as Qwen2.5-1.5B).
- sampler: tokens/s of the torch sampler, generate() (and vLLM's CPU engine on a CPU), no stop
  token, at the rollout (temperature 1) and eval (0.7, top-p 0.95) settings. GPU: the 1.5B shape, 16
  prompts x 4 samples x 512 new tokens, decode='eager' and 'graph'; CPU: a tiny Qwen3, 16 x 4 x 128.
  Also the time a decode step takes to turn its logits into the sampling distribution at each
  setting, and top-p's sort alone.
- forward: model.py's forward against transformers' on the same weights, and with taps only (no LM
  head). GPU: the 1.5B shape in bf16, 4 x 4096 tokens; CPU: the tiny Qwen3 in fp32, 8 x 256.
- variance (CPU): each method's gradient over repeated rollouts of tiny.py's student: relative
  variance, SNR.
- align: re-tokenization and alignment across tokenizers of one `response_len`-token rollout
  (align.rollout_view, which distill.py runs beside the sampler), and what is left before the step's
  first forward (batch.teacher_batch with that view), as fractions of one OPRD update of tiny.py's
  cross-tokenizer pair (byte student, BPE Llama teacher) on it.
- peer (CPU): distill.py's opd_full and oprd against TRL's DistillationTrainer (on-policy,
  full-vocabulary reverse KL) on a tiny random Qwen3 pair (teacher 4 layers, student 2, d = 128), 8
  prompts x 64 new tokens, fp32, one process each: seconds per whole step (median of `peer_steps`
  after the first), distill/TRL ratios, where each step goes (the median of each part; TRL's: its
  generation and the rest), opd_full's floor (its FLOPs at this core's measured matmul rate) and two
  costs it leaves out (a decode step's ATen calls; FSDP2 at one rank against the plain student), at
  vocabularies 512 and 151,936. TRL is no dependency of this project: without it the section prints
  how to install it.
- async (CPU): distill.py's colocated loop (one process, `async_threads` threads) against 1 trainer
  rank + 1 sampler rank one step behind (rollout_ranks=1, the threads shared out), from tiny.py's
  shipped pair, at each of `async_prompts_per_step`: seconds per step (the median after two
  warm-up steps), each side's wait, the ratio; the colocated loop on one side's threads too, for
  what a split could give at best and how much the two sides slow each other (lab/overlap.py).
`sections=all` leaves the CPU sections out on a GPU. --json puts the headline oprd_speedup_vs_topk
and oprd_mem_ratio_vs_topk (paper shape, or paper-proportioned on a CPU) at the top level.
"""
import contextlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

import data
from configurator import configure
from fsdp import MemoryMeter, setup_distributed, shard
from batch import Rollout, StepCounts, collate, supervise, teacher_batch
from losses import Maps, make_plan, micro_batch_loss
from model import ModelConfig, Transformer
from rollout import VLLMSampler, vllm_available
from sampler import TorchSampler
from tokenizer import load_tokenizer
from lab.measure import (CPU, QWEN_1P5B, TINY_QWEN3, best_time, body_to_head, describe, hf_copy,
                          random_model, update_flops)

CONFIG = dict(
    sections="all",       # comma-separated section names, or 'all'
    json="",              # write every figure to this file
    device="auto",        # auto (cuda if available, else cpu) | cuda | cpu
    repeats=3,            # timed runs per measurement (best kept)
    response_len=16384,   # GPU update: response tokens of the one rollout
                          # (the paper's max_new_tokens)
    peak_tflops=989.0,    # the GPU's dense bf16 peak, for MFU (H200: 989 TFLOP/s)
    with_vllm=True,       # include vLLM in the CPU sampler section (if it imports)
    threads=0,            # torch CPU threads, also of the processes lab/bench.py starts;
                          # 0 = torch's default
    variance_rollouts=8,  # rollouts per method in the variance section
    peer_steps=5,         # training steps per run in the peer section (the first is the warm-up)
    async_threads=2,      # async section: the colocated process's threads, shared out by the
                          # trainer rank and the sampler rank
    async_steps=12,       # async section: steps per run (the first two are the warm-up)
    async_prompts_per_step='32,8',  # async section: its workloads (comma-separated)
    async_rounds=2,       # async section: each workload's three runs, this many times in turn
)
# --------------------------------------------------------------------------- update cost per method
UPDATE_METHODS = ("oprd", "opd", "opd_topk", "opd_full", "opd+oprd")
# Qwen's vocabulary on a small body (LM head 12x the blocks); Qwen2.5-1.5B shrunk, body:head kept
CPU_SHAPES = {
    "head-dominated": dict(model_type="qwen3", vocab_size=151936, hidden_size=256,
                           intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64),
    "paper-proportioned": dict(model_type="qwen2", vocab_size=5504, hidden_size=384,
                               intermediate_size=2240, num_hidden_layers=4, num_attention_heads=6,
                               num_key_value_heads=2, head_dim=64)}
# sequences, prompt tokens, response tokens (on a GPU: 1, 512, response_len)
CPU_BATCH = (4, 128, 896)

def update_loss(student, teacher, batch, plan):
    """One micro-batch of distill.py's update: teacher forward (no grad, only the rows a loss reads
    kept), student forward, the loss to backpropagate (this batch's token mean)."""
    b = supervise(batch, plan)
    with torch.no_grad():
        hs_t = teacher(b.ids, attention_mask=b.attention_mask, taps=plan.t_taps)
        rows_t = {l: h[b.keep] for l, h in hs_t.items()}
    hs_s = student(b.ids, attention_mask=b.attention_mask, taps=plan.s_taps)
    counts = StepCounts(b.out_mask.sum().item(), b.oprd_mask.sum().item())
    maps = Maps(student.lm_head.weight, teacher.lm_head.weight)
    return micro_batch_loss(plan, b, hs_s, rows_t, counts, maps)[0]

def update_table(shape, sequences, prompt_len, response_len, device, methods=UPDATE_METHODS,
                 chunks=(1024, 0), repeats=3, peak_tflops=0.0):
    """Every method's update at one shape, {'methods': {method: {'chunked' | 'one_chunk': figures}},
    ...}, a line printed per method. chunks: vocab_chunk_tokens per run, 0 = one chunk (every logit
    row at once). The student under FSDP2 in a one-rank group, as distill.py alone; a run that fails
    (out of memory) records its error."""
    cuda = device.type == "cuda"
    c = ModelConfig(**shape)
    # fp32 weights, bf16 compute on a GPU (shard)
    student = random_model(shape, device, torch.float32, seed=0)
    teacher_dtype = torch.bfloat16 if cuda else torch.float32
    teacher = random_model(shape, device, teacher_dtype, seed=1).requires_grad_(False)
    student.activation_checkpointing = True
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(0, min(shape["vocab_size"], 151665), (n,), generator=g).tolist()

    rollouts = [Rollout(ids(prompt_len), ids(response_len), "stop") for _ in range(sequences)]
    batch = collate(rollouts, 0, device)
    T = batch.ids.shape[1]
    rows = batch.out_mask.sum().item()
    tokens = batch.attention_mask.sum().item()
    res = dict(shape=shape, sequences=sequences, prompt_len=prompt_len, response_len=response_len,
               body_to_head=body_to_head(shape), body_to_head_with_attention=body_to_head(shape, T),
               methods={})
    mem = MemoryMeter(device)
    peaks = []

    # its transient peak: the allocator's or the resident set's counters, which need no sync
    def update(plan):
        mem.start()
        update_loss(student, teacher, batch, plan).backward()
        student.zero_grad(set_to_none=True)
        peaks.append(mem.transient())
    setup_distributed(device.type, 10)
    try:
        student = shard(student, device, torch.bfloat16 if cuda else torch.float32,
                        dist.group.WORLD)
        for m in methods:
            by = res["methods"][m] = {}
            for chunk in chunks:
                plan = make_plan(m, c, c, layers="all", positions="last_k", k_positions=2000,
                                 topk=16, chunk=chunk or rows)
                flops, hw_flops = update_flops(plan, c, c, sequences, T, rows, checkpointing=True)
                setting = "one_chunk" if chunk == 0 else "chunked"
                r = by[setting] = dict(vocab_chunk_tokens=chunk or rows)
                try:
                    peaks.clear()
                    seconds = best_time(lambda: update(plan), repeats, device)
                    transient = max(peaks[1:])
                except Exception as e:  # e.g. out of memory in one chunk: keep the others
                    r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                # outside the except block, so the failed run's tensors can be freed
                if "error" in r:
                    student.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache() if cuda else None
                    continue
                r.update(seconds=seconds, transient_mb=transient / 2**20,
                         tokens_per_s=tokens / seconds, model_tflop=flops / 1e12,
                         tflops=flops / seconds / 1e12)
                if peak_tflops:
                    r.update(mfu=r["tflops"] / peak_tflops,
                             hfu=hw_flops / seconds / 1e12 / peak_tflops)
            # GB = 2^30 bytes, as the paper's (verl's) logs
            unit, scale = ("GB", 1 / 1024) if cuda else ("MB", 1)
            figures = []
            for setting, fig in by.items():
                if "error" in fig:
                    figures.append(f"{setting} failed: {fig['error']}")
                    continue
                rate = (f"MFU {fig['mfu']:.1%}" if "mfu" in fig
                        else f"{fig['tflops'] * 1e3:.0f} GFLOP/s")
                figures.append(f"{setting} (chunk {fig['vocab_chunk_tokens']}): "
                               f"{fig['seconds']:.2f} s, {fig['tokens_per_s']:,.0f} tok/s, "
                               f"{fig['transient_mb'] * scale:,.1f} {unit}, " + rate)
            print(f"  {m:>10}: " + " | ".join(figures), flush=True)
    finally:
        dist.destroy_process_group()
    return res

def add_ratios(res):
    """OPRD's update (chunked) against top-16 OPD's, chunked and in one chunk (as the paper's
    trainer): speed-up and memory ratio, at the top level and printed. A memory ratio is None when
    top-16 showed no transient peak: on a CPU the resident set's high-water mark can stand above it
    already."""
    oprd = res["methods"].get("oprd", {}).get("chunked", {})
    parts = []
    for setting, suffix in (("chunked", ""), ("one_chunk", "_one_chunk")):
        topk = res["methods"].get("opd_topk", {}).get(setting, {})
        if "seconds" in oprd and "seconds" in topk:
            speedup = topk["seconds"] / oprd["seconds"]
            mem = oprd["transient_mb"] / topk["transient_mb"] if topk["transient_mb"] else None
            res["oprd_speedup_vs_topk" + suffix] = speedup
            res["oprd_mem_ratio_vs_topk" + suffix] = mem
            mem_text = f"{mem:.2f}x" if mem else "?"
            parts.append(f"vs top-16 {setting}: {speedup:.2f}x faster, {mem_text} the memory")
    measured = "; ".join(parts) or "vs top-16 OPD: not measured"
    print("  OPRD " + measured + " (paper, 8 x A100: 1.44x over the run, 0.46x the memory)",
          flush=True)

def update_on_cpu(shape_name, method, repeats, threads):
    """One method at one CPU shape, in a fresh process (bench_update's child) so that no method's
    freed memory hides another's peak; glibc returns every block above 64 KiB to the system, so the
    resident set follows live tensors."""
    import ctypes
    with contextlib.suppress(OSError, AttributeError):  # glibc's mallopt(M_MMAP_THRESHOLD, 64 KiB)
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)
    torch.set_num_threads(threads) if threads else None
    torch.set_flush_denormal(True)
    return update_table(CPU_SHAPES[shape_name], *CPU_BATCH, CPU, methods=(method,), chunks=(1024,),
                        repeats=repeats)

def bench_update(cfg, device):
    cuda = device.type == "cuda"
    if cuda:
        shapes = {"paper shape": QWEN_1P5B}
        B, P, R = 1, 512, cfg["response_len"]
    else:
        shapes = CPU_SHAPES
        B, P, R = CPU_BATCH
    if cuda:
        setting = f"bf16 compute; MFU against {cfg['peak_tflops']:.0f} TFLOP/s"
    else:
        setting = "fp32, a process per method"
    out = {}
    for name, shape in shapes.items():
        print(f"update, {name} ({describe(shape)}, random weights), {B} x ({P} + {R:,}) tokens, "
              f"FSDP2 on one rank, {setting}; body:head FLOPs per token "
              f"{body_to_head(shape):.2f}:1 ({body_to_head(shape, P + R):.2f}:1 with attention "
              f"over {P + R:,} tokens)", flush=True)
        if cuda:
            res = update_table(shape, B, P, R, device, repeats=cfg["repeats"],
                               peak_tflops=cfg["peak_tflops"])
        for m in () if cuda else UPDATE_METHODS:
            with multiprocessing.get_context("spawn").Pool(1) as child:
                r = child.apply(update_on_cpu, (name, m, cfg["repeats"], cfg["threads"]))
            if m == UPDATE_METHODS[0]:
                res = r
            else:
                res = dict(res, methods=dict(res["methods"], **r["methods"]))
        add_ratios(res)
        out[name] = res
    return out["paper shape"] if cuda else out

# ----------------------------------------------------------------------------- sampler
SAMPLER_PROMPTS = {"cpu": dict(n_prompts=16, min_len=8, max_len=64, n=4, max_new_tokens=128),
                   "cuda": dict(n_prompts=16, min_len=64, max_len=256, n=4, max_new_tokens=512)}
SAMPLER_SETTINGS = {
    "rollout": dict(temperature=1.0, top_p=1.0),  # distill.py's rollouts (METHOD.md 5)
    "eval": dict(temperature=0.7, top_p=0.95),    # eval.py's protocol (METHOD.md 6)
}

# generate() on prompts left-padded, as it wants for a decoder-only model
def hf_generate_fn(hf, prompts, s, device):
    def left(xs):
        return torch.nn.utils.rnn.pad_sequence(xs, True, padding_side="left").to(device)
    ids = left([torch.tensor(p) for p in prompts])
    mask = left([torch.ones(len(p), dtype=torch.long) for p in prompts])
    def run(st):
        with torch.inference_mode():  # top_k=0: generate() would apply its default top-k of 50
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                              pad_token_id=0, max_new_tokens=s["max_new_tokens"],
                              num_return_sequences=s["n"], **st)
        assert out.shape == (len(prompts) * s["n"], ids.shape[1] + s["max_new_tokens"])
    return run

# the torch sampler's generate() or the vLLM engine's: the same arguments
def sampler_fn(sampler, prompts, s):
    def run(st):
        out = sampler.generate(prompts, n=s["n"], max_new_tokens=s["max_new_tokens"], stop_ids=[],
                               **st)
        n_tokens = sum(len(x.tokens) for r in out for x in r)
        assert n_tokens == len(prompts) * s["n"] * s["max_new_tokens"]
    return run

def bench_sampler(cfg, device):
    cuda = device.type == "cuda"
    s = SAMPLER_PROMPTS[device.type]
    shape = QWEN_1P5B if cuda else TINY_QWEN3
    model = random_model(shape, device, torch.bfloat16 if cuda else torch.float32, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(s["min_len"], s["max_len"] + 1, (s["n_prompts"],), generator=g)
    prompts = [torch.randint(0, shape["vocab_size"], (int(L),), generator=g).tolist()
               for L in lengths]
    n_tokens = s["n_prompts"] * s["n"] * s["max_new_tokens"]
    res = dict(model=f"{describe(shape)}, random weights, {'bf16' if cuda else 'fp32'}", prompts=s,
               tokens_per_run=n_tokens, torch_threads=torch.get_num_threads())
    runs = {"hf_generate": hf_generate_fn(hf_copy(model), prompts, s, device)}
    for decode in ("eager", "graph") if cuda else ("eager",):
        runs[f"torch_{decode}"] = sampler_fn(TorchSampler(model=model, decode=decode), prompts, s)
    engine = None
    path = tempfile.mkdtemp(prefix="bench_sampler_")
    # the engine loads a checkpoint of the same weights
    if not cuda and cfg["with_vllm"] and vllm_available():
        model.save_pretrained(path)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        t0 = time.perf_counter()
        engine = VLLMSampler(path, dtype="float32")  # as rollouts use it (compiled, not eager)
        res["vllm_start_s"] = time.perf_counter() - t0
        runs["vllm"] = sampler_fn(engine, prompts, s)
    # a GPU's runs are long and steady: one after the warm-up
    repeats = 1 if cuda else cfg["repeats"]
    for name, st in SAMPLER_SETTINGS.items():
        r = res[name] = dict(settings=st)
        # the warm-up is full length: CUDA graphs are captured at the timed shapes
        for who, run in runs.items():
            r[f"{who}_tok_s"] = n_tokens / best_time(lambda: run(st), repeats, device)
        others = [w for w in runs if w != "hf_generate"]
        r.update({f"{w}_over_hf": r[w + "_tok_s"] / r["hf_generate_tok_s"] for w in others})
        rates = ", ".join(f"{w} {r[w + '_tok_s']:,.0f}" for w in runs)
        ratios = ", ".join(f"{w} {r[w + '_over_hf']:.2f}x" for w in others)
        print(f"sampler [{name}: T={st['temperature']}, top_p={st['top_p']}] tokens/s: " + rates
              + " | over generate(): " + ratios + " (goal: torch >= 2x)", flush=True)
    engine.close() if engine is not None else None
    shutil.rmtree(path, ignore_errors=True)
    res["step_logits"] = step_logits_times(s["n_prompts"] * s["n"], shape["vocab_size"], device,
                                           cfg["repeats"])
    return res


def step_logits_times(rows, vocab, device, repeats):
    """Seconds a decode step spends turning its (rows, vocab) logits into the sampling distribution
    (sampling.process_logits) at each of SAMPLER_SETTINGS, and top-p's sort of the probabilities
    alone: where the eval settings' time goes."""
    from sampling import process_logits
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).to(device)
    probs = logits.softmax(-1)
    t = {name: best_time(lambda: process_logits(logits, st["temperature"], -1, st["top_p"]),
                         repeats, device)
         for name, st in SAMPLER_SETTINGS.items()}
    t["sort"] = best_time(lambda: probs.sort(-1), repeats, device)
    shown = ", ".join(f"{name} {sec * 1e3:.2f} ms" for name, sec in t.items())
    print(f"sampler: a step's ({rows}, {vocab:,}) logits to its distribution: {shown} (top-p's "
          "sort alone)", flush=True)
    return t

# ----------------------------------------------------------------- model.py forward vs transformers
def bench_forward(cfg, device):
    cuda = device.type == "cuda"
    shape, (B, T) = (QWEN_1P5B, (4, 4096)) if cuda else (TINY_QWEN3, (8, 256))
    ours = random_model(shape, device, torch.bfloat16 if cuda else torch.float32, seed=0)
    hf = hf_copy(ours)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, shape["vocab_size"], (B, T), generator=g).to(device)
    t = lambda fn: best_time(fn, cfg["repeats"], device)  # noqa: E731
    with torch.inference_mode():
        t_ours = t(lambda: ours(idx))
        t_hf = t(lambda: hf(idx).logits)
        t_taps = t(lambda: ours(idx, taps=range(1, shape["num_hidden_layers"] + 1)))
    res = dict(model=f"{describe(shape)}, random weights, {'bf16' if cuda else 'fp32'}",
               tokens=[B, T], ours_s=t_ours, hf_s=t_hf, taps_s=t_taps, ours_over_hf=t_hf / t_ours,
               taps_over_logits=t_ours / t_taps)
    print(f"forward ({res['model']}, {B} x {T} tokens): model.py {t_ours * 1e3:.1f} ms, "
          f"transformers {t_hf * 1e3:.1f} ms -> {res['ours_over_hf']:.2f}x; all taps without the "
          f"LM head {t_taps * 1e3:.1f} ms ({res['taps_over_logits']:.2f}x faster than logits)",
          flush=True)
    return res

# --------------------------------------------------------------------- gradient variance per method
VARIANCE_METHODS = ("oprd", "opd", "opd_topk", "opd_full")

def bench_variance(cfg, device):
    """The paper's variance argument on tiny.py's pair: each method's full gradient on R rollouts of
    the same prompts from the same weights, its relative variance E||g - mean g||^2 / ||mean g||^2
    (SNR = its inverse). The rollouts are common to all; OPRD's and full-KL's gradients are exact
    given one, sampled-token OPD's a REINFORCE estimate."""
    R = cfg["variance_rollouts"]
    n_prompts = 8
    import tiny
    paths = {who: os.path.join(tiny.MODELS, who) for who in ("teacher", "student")}
    if not all(os.path.isfile(os.path.join(path, "config.json")) for path in paths.values()):
        raise FileNotFoundError(f"the variance section measures tiny.py's pair, shipped in "
                                f"{tiny.MODELS}: restore it from git, or make it "
                                "(python tiny.py --remake=True)")
    student = Transformer.from_pretrained(paths["student"])
    teacher = Transformer.from_pretrained(paths["teacher"])
    tok = load_tokenizer(paths["student"])
    prompts = [tok.chat(data.build_prompt(p)) for p in data.load_problems("tiny_train")[:n_prompts]]
    sampler = TorchSampler(model=student)
    grads = {m: [] for m in VARIANCE_METHODS}
    for r in range(R):
        # T = 1
        samples = sampler.generate(prompts, n=2, max_new_tokens=48, stop_ids=tok.eos_ids,
                                   seed=1000 + r)
        rollouts = [Rollout(p, s.tokens, s.finish) for p, ss in zip(prompts, samples) for s in ss]
        batch = collate(rollouts, 0, CPU)
        for m in VARIANCE_METHODS:
            plan = make_plan(m, student.config, teacher.config, layers="all", positions="all",
                             topk=16)
            update_loss(student, teacher.requires_grad_(False), batch, plan).backward()
            grads[m].append(torch.cat([p.grad.flatten() for p in student.parameters()
                                       if p.grad is not None]))
            student.zero_grad(set_to_none=True)
    res = dict(rollouts=R, prompts=n_prompts,
               models=[tiny.model_path("teacher"), tiny.model_path("student")], methods={})
    for m, gs in grads.items():
        G = torch.stack(gs).double()
        rel_var = ((G - G.mean(0)).pow(2).sum(1).mean() / G.mean(0).pow(2).sum()).item()
        res["methods"][m] = dict(relative_variance=rel_var, snr=1 / rel_var)
    print(f"gradient SNR over {R} rollouts of the same {n_prompts} prompts (higher = less noise): "
          + ", ".join(f"{m} {r['snr']:.3g}" for m, r in res["methods"].items()))
    return res

# --------------------------------------------------------- sampler ranks (lab/overlap.py)
def bench_async(cfg, device):
    from lab import overlap  # its own file: it runs distill.py in both set-ups
    return overlap.bench_async(cfg, device)


# ------------------------------------------------------------------------ against TRL (lab/peer.py)
def bench_peer(cfg, device):
    from lab import peer  # its own file: TRL's trainer and its helpers
    return peer.bench_peer(cfg, device)

# ---------------------------------------------------------------------- alignment across tokenizers
def bench_align(cfg, device):
    """align.rollout_view (beside the sampler) and align.teacher_batch given that view (before the
    first forward) on one rollout of response_len tokens of the tiny task's text (the byte student;
    the BPE teacher of tiny.py --xtok=True), against one OPRD update (both forwards, backward) of
    tiny.py's shapes on it."""
    import align
    import tiny
    from tokenizer import ByteTokenizer, load_tokenizer
    root = tempfile.mkdtemp(prefix="bench_align_")
    try:
        tiny.make_bpe_tokenizer(root)
        s_tok = ByteTokenizer()
        t_tok = load_tokenizer(root)
        problems = data.load_problems("tiny_train")
        text = "\n".join(p["solution"] for p in problems[:cfg["response_len"] // 20])
        seq = Rollout(s_tok.chat(problems[0]["prompt"]), s_tok.encode(text)[:cfg["response_len"]],
                      "length", None, problems[0]["prompt"])
        s_shape = dict(tiny.SHAPES["student"], model_type="qwen3", vocab_size=s_tok.vocab_size,
                       head_dim=32)
        stu = random_model(s_shape, device, torch.float32, seed=0)
        xt = {k: v for k, v in tiny.SHAPES["xteacher"].items() if k != "tokenizer"}
        tea = random_model(dict(xt, vocab_size=t_tok.vocab_size, head_dim=64), device,
                           torch.float32, seed=1)
        plan = make_plan("oprd", stu.config, tea.config, positions="all")

        def view():
            return align.rollout_view(seq.messages, seq.response, seq.finish, s_tok, t_tok)

        beside = best_time(view, cfg["repeats"], device)
        seq.view = view()  # as distill.py carries a rollout
        t_b, s_mask, _ = teacher_batch([seq], t_tok, plan, device)
        seconds = best_time(lambda: teacher_batch([seq], t_tok, plan, device), cfg["repeats"],
                            device)
        b = collate([seq], s_tok.pad_id, device)
        b.oprd_mask, b.teacher = s_mask, t_b
        proj = torch.nn.ModuleDict(
            {str(l): torch.nn.Linear(stu.config.hidden_size, tea.config.hidden_size)
             for l in plan.s_layers})
        def update():
            with torch.no_grad():
                rows_t = tea(t_b.ids, attention_mask=t_b.attention_mask, taps=plan.t_taps,
                             rows=t_b.keep)
            hs_s = stu(b.ids, attention_mask=b.attention_mask, taps=plan.s_taps)
            counts = StepCounts(0, int(s_mask.sum()))
            micro_batch_loss(plan, b, hs_s, rows_t, counts, Maps(projector=proj))[0].backward()
        step = best_time(update, cfg["repeats"], device)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res = dict(response_tokens=len(seq.response), chunks=int(s_mask.sum()), beside_seconds=beside,
               align_seconds=seconds, update_seconds=step, beside_fraction=beside / step,
               fraction_of_update=seconds / step)
    print(f"align: {res['response_tokens']:,}-token rollout, {res['chunks']:,} chunks: "
          f"re-tokenization and alignment {beside * 1e3:.1f} ms beside the sampler "
          f"({res['beside_fraction']:.1%} of one OPRD update of tiny.py's pair on it, "
          f"{step:.2f} s); left before the first forward: {seconds * 1e3:.1f} ms "
          f"({res['fraction_of_update']:.1%})", flush=True)
    return res

SECTIONS = {"update": bench_update, "forward": bench_forward, "sampler": bench_sampler,
            "variance": bench_variance, "peer": bench_peer, "align": bench_align,
            "async": bench_async}
CPU_ONLY = ("variance", "peer", "async")

# ----------------------------------------------------------------------------- main
def positive_counts(text):
    """Whether text is one or more comma-separated whole numbers, each >= 1."""
    parts = str(text).split(",")
    return all(p.strip().isdigit() and int(p) >= 1 for p in parts)


def main(argv=None):
    cfg = configure(dict(CONFIG), __file__, argv)
    if cfg["sections"] == "all":
        names = list(SECTIONS)
    else:
        names = [s.strip() for s in cfg["sections"].split(",") if s.strip()]
    rules = dict(repeats=(cfg["repeats"] >= 1, ">= 1"),
                 response_len=(cfg["response_len"] >= 1, ">= 1"),
                 variance_rollouts=(cfg["variance_rollouts"] >= 2, ">= 2"),
                 peer_steps=(cfg["peer_steps"] >= 2, ">= 2"),
                 async_threads=(cfg["async_threads"] >= 2, ">= 2"),
                 async_steps=(cfg["async_steps"] >= 3, ">= 3"),
                 async_rounds=(cfg["async_rounds"] >= 1, ">= 1"),
                 async_prompts_per_step=(positive_counts(cfg["async_prompts_per_step"]),
                                         "comma-separated counts >= 1"),
                 threads=(cfg["threads"] >= 0, ">= 0"),
                 peak_tflops=(cfg["peak_tflops"] > 0, "> 0"),
                 device=(cfg["device"] in ("auto", "cuda", "cpu"), "auto, cuda or cpu"))
    problems = [f"{key}={cfg[key]!r}: must be {want}"
                for key, (ok, want) in rules.items() if not ok]
    problems += [f"unknown section {s!r}; known: {', '.join(SECTIONS)}"
                 for s in names if s not in SECTIONS]
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        problems.append("device=cuda but torch sees no GPU")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(cfg["threads"]) if cfg["threads"] else None
    torch.set_flush_denormal(True)  # as distill.py and the torch sampler run
    on_gpu = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else CPU
    names = [s for s in names if not (on_gpu and cfg["sections"] == "all" and s in CPU_ONLY)]
    results = dict(machine=dict(device=str(device), cpus=os.cpu_count(), torch=torch.__version__,
                                gpu=torch.cuda.get_device_name(device) if on_gpu else None,
                                load_average_at_start=os.getloadavg()[0]))
    t_start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            results[name] = SECTIONS[name](cfg, CPU if name in CPU_ONLY else device)
        except Exception as e:  # one failing section: its error, and the others still run
            traceback.print_exc()
            print(f"section {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            results[name] = dict(error=f"{type(e).__name__}: {e}")
        torch.cuda.empty_cache() if on_gpu else None
        results[name + "_seconds"] = time.perf_counter() - t0
        print(f"({name}: {results[name + '_seconds']:.0f} s)", flush=True)
        update_results = results.get("update", {})
        # or the paper shape
        headline = update_results.get("paper-proportioned", update_results)
        results.update({k: v for k, v in headline.items() if k.startswith("oprd_")})
        results["machine"].update(load_average_at_end=os.getloadavg()[0],
                                  total_seconds=time.perf_counter() - t_start)
        if cfg["json"]:  # after every section, so a run cut short keeps what it measured
            with open(cfg["json"], "w") as f:
                json.dump(results, f, indent=2)
    if cfg["json"]:
        print(f"wrote {cfg['json']} ({results['machine']['total_seconds']:.0f} s in all)")

# the guard matters: vLLM's engine and bench_update's children start by spawning
if __name__ == "__main__":
    main()
