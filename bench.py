"""
Benchmarks: one section per function, each returning its figures; all printed as measured, and written to a
JSON file with --json (rewritten after every section, so a run cut short keeps what it measured).

$ python bench.py --device=cuda --json=bench.json     # one H200: update, sampler, forward; about 4 minutes
$ python bench.py --json=bench.json                   # every section (--device=auto: cuda if present, else cpu)
$ python bench.py --sections=update --device=cpu --threads=1 --json=bench.json  # 2 busy cores: about 15 minutes
$ python bench.py --sections=sampler --with_vllm=False --repeats=5

Sections (on a GPU the models are Qwen2.5-1.5B-shaped with random weights, built on the device: no checkpoint)
- update: one training update (teacher forward, student forward + backward, as distill.py's update without the
  optimizer step, which is the same for every method) per method on the same rollout: seconds, tokens/s and
  transient peak memory (peak during the update minus memory at its start, the paper's Table 3), as ratios to
  top-16 OPD.
    GPU: the paper's shape: Qwen2.5-1.5B student and teacher, one rollout of 512 + `response_len` (16,384)
    tokens, all 28 layers, the last 2000 positions, top-16, activation checkpointing, the student under FSDP2
    with bf16 compute on a one-rank process group (as under torchrun), the teacher replicated in bf16; every
    method with the logits chunked by 1024 positions (distill.py's default) and in one chunk (the whole
    sequence's logits at once, as a trainer that does not chunk), with model FLOPs utilisation (update_flops).
    CPU: two small shapes, each method in a fresh process, fp32 under FSDP2 on one rank (as distill.py on a CPU),
    activation checkpointing: "head-dominated" (Qwen's vocabulary on a d = 256 body, where the LM head is most of
    the model) and "paper-proportioned" (its body-to-head FLOP ratio that of Qwen2.5-1.5B, about 5.6:1).
- sampler: generated tokens per second of rollout.py's torch sampler against transformers' generate() (and the
  vLLM engine on CPU, the CPU build), the same prompts, no stop token, under two settings: rollouts
  (temperature 1) and eval (temperature 0.7, top-p 0.95). GPU: 16 prompts x 4 samples x 512 new tokens, the
  torch sampler with decode='eager' and decode='graph' when it takes that argument. CPU: a tiny random Qwen3,
  16 prompts x 4 samples x 128 new tokens. Goal: the torch sampler >= 2x generate().
- forward: model.py's forward against transformers' on the same weights, and the same forward with taps only
  (no LM head); on a GPU also forward + backward.
- variance: each method's gradient over repeated rollouts of the same prompts from the same weights: its
  relative variance and signal-to-noise ratio. Runs on the CPU on any machine (tiny models: it measures the
  estimators, not speed), so `sections=all` leaves it out on a GPU; name it to run it there.

`--json FILE` writes every figure, with the headline keys oprd_speedup_vs_topk and oprd_mem_ratio_vs_topk at
the top level (the paper shape on a GPU, the paper-proportioned shape on a CPU). Timings are the best of
`repeats` runs after a warm-up (the GPU sampler: one run after a full-length warm-up). A section that fails
prints its error and the others still run. Other processes competing for the cores hurt every CPU figure
(threads spin-wait on each other; --threads=1 suffers least), so the load average is recorded alongside.
"""
import contextlib
import inspect
import json as jsonlib
import os
import shutil
import sys
import tempfile
import time
import traceback

import torch

CONFIG = dict(
    sections="all",   # comma-separated section names, or 'all'
    json="",          # write every figure to this file
    device="auto",    # auto (cuda if available, else cpu) | cuda | cpu
    repeats=3,        # timed runs per measurement (best kept)
    response_len=16384,   # GPU update: response tokens of the one rollout (the paper's max_new_tokens)
    peak_tflops=989.0,    # the GPU's dense bf16 peak, for MFU (H200: 989 TFLOP/s)
    with_vllm=True,   # include vLLM in the CPU sampler section (if it imports)
    threads=0,        # torch CPU threads for the in-process runs; 0 = torch's default
    variance_rollouts=8,  # rollouts per method in the variance section
    update_method="", # internal: time one update of this method in this process, print it as JSON
    update_shape="",  # internal: ... at this CPU shape
)


def best_time(fn, repeats, device=None):
    """Best wall time of `repeats` calls of fn(warmup=False), after one fn(warmup=True)."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    fn(warmup=True)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(warmup=False)
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


# ----------------------------------------------------------------------------- models of a given shape

# the paper's student and teacher (DeepSeek-R1-Distill-Qwen-1.5B, JustRL-DeepSeek-1.5B): the Qwen2.5-1.5B shape
QWEN_1P5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                 rope_theta=10000.0, tie_word_embeddings=False)


def random_model(shape, device, dtype, seed):
    """model.py's Transformer of this shape with random weights (matrices normal with std 0.02, norms 1,
    biases 0), built directly on `device`: no checkpoint is written or read."""
    from model import ModelConfig, Transformer
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(ModelConfig(**shape))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.zero_()
    return model.to(dtype)


def hf_copy(model):
    """transformers' model of the same architecture holding the same weights (the names are Hugging Face's)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from model import to_hf_config
    d = to_hf_config(model.config)
    hf_cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    p = next(model.parameters())
    with torch.device(p.device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=p.dtype)
    hf.load_state_dict(model.state_dict())
    return hf.eval()


def describe(shape):
    return (f"d={shape['hidden_size']:,}, {shape['num_hidden_layers']} layers, V={shape['vocab_size']:,}")


# ----------------------------------------------------------------------------- FLOP count (for MFU)

def block_params(c):
    """Weights of one block's matrices (q, k, v, o, gate, up, down): 2 FLOPs each per token in a forward."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return c.hidden_size * (q + 2 * kv) + q * c.hidden_size + 3 * c.hidden_size * c.intermediate_size


def forward_flops(c, sequences, T, blocks, head_rows):
    """FLOPs of one forward of `sequences` x T tokens through the first `blocks` blocks, and the LM head on
    head_rows rows:
        blocks * (2 * block_params * tokens  +  4 * nh*hs * pairs)  +  2 * d * V * head_rows
    pairs = sequences * T(T+1)/2, the causal (query, key) pairs; QK^T and AV cost 2 x 2 x nh*hs FLOPs per pair
    (= the usual 4 * T^2 * d / 2 per layer when nh*hs = d). Norms, RoPE, softmax, the loss: not counted."""
    pairs = sequences * T * (T + 1) // 2
    attn = 4 * c.num_attention_heads * c.head_dim * pairs
    return blocks * (2 * block_params(c) * sequences * T + attn) + 2 * c.hidden_size * c.vocab_size * head_rows


def update_flops(plan, c_s, c_t, sequences, T, head_rows, checkpointing):
    """FLOPs of one update, as distill.py computes it (micro_batch_loss + backward):
        model    = teacher forward (up to its deepest tap; LM head only if the loss needs logits)
                 + 3 x student forward (forward, and backward = 2 x forward)
        hardware = model + the student's blocks again (activation checkpointing recomputes them in backward)
                 + both LM heads again (each vocabulary chunk is recomputed in backward, the teacher's too)
    MFU = model / seconds / peak; HFU = hardware / seconds / peak."""
    rows = head_rows if plan.out_kind else 0
    t_blocks, s_blocks = min(plan.t_taps[-1], plan.L_t), min(plan.s_taps[-1], plan.L_s)
    model = forward_flops(c_t, sequences, T, t_blocks, rows) + 3 * forward_flops(c_s, sequences, T, s_blocks, rows)
    hardware = model + 2 * rows * (c_s.hidden_size * c_s.vocab_size + c_t.hidden_size * c_t.vocab_size)
    if checkpointing:
        hardware += forward_flops(c_s, sequences, T, s_blocks, 0)
    return model, hardware


def body_to_head(shape, T=None):
    """Per-token FLOPs of all blocks over those of the LM head: the ratio of their weights; with T, the blocks
    also get their causal attention over a sequence of T tokens."""
    from model import ModelConfig
    c = ModelConfig(**shape)
    body = forward_flops(c, 1, T or 1, c.num_hidden_layers, 0) if T else 2 * c.num_hidden_layers * block_params(c)
    return body / (2 * c.hidden_size * c.vocab_size * (T or 1))


# ----------------------------------------------------------------------------- update cost per method

UPDATE_METHODS = ("oprd", "opd", "opd_topk", "opd_full", "opd+oprd")
# the CPU shapes: one process per method, fp32, 4 rollouts of 128 + 896 tokens
CPU_SHAPES = {
    # Qwen's vocabulary on a small body: the LM head is 12x the blocks (body:head 0.08:1)
    "head-dominated": dict(model_type="qwen3", vocab_size=151936, hidden_size=256, intermediate_size=768,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                           tie_word_embeddings=False),
    # Qwen2.5-1.5B's proportions, shrunk to run in minutes on a CPU: intermediate ~5.8 d, 3 query heads per kv
    # head, 4 layers instead of 28, and the vocabulary sized so that body:head = 5.6:1, as at 1.5B
    "paper-proportioned": dict(model_type="qwen2", vocab_size=5504, hidden_size=384, intermediate_size=2240,
                               num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                               tie_word_embeddings=False),
}
CPU_BATCH = dict(sequences=4, prompt_len=128, response_len=896)
GPU_BATCH = dict(sequences=1, prompt_len=512)  # response_len from CONFIG


def random_rollouts(sequences, prompt_len, response_len, vocab, device, seed=1):
    from distill import collate
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, min(vocab, 151665), (n,), generator=g).tolist()  # noqa: E731
    return collate([(ids(prompt_len), ids(response_len), "stop") for _ in range(sequences)], 0, device)


@contextlib.contextmanager
def one_rank_group(device):
    """A process group of one rank (nccl on a GPU, gloo on a CPU), so shard() runs FSDP2 as under torchrun."""
    import torch.distributed as dist
    if dist.is_initialized():  # already under torchrun
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def time_update(student, teacher, batch, plan, repeats, device):
    """Seconds of one update (best of `repeats` after a warm-up) and its transient peak memory in bytes (the
    largest over the timed runs): teacher forward, student forward and backward, gradients freed after."""
    from distill import MemoryMeter, micro_batch_loss
    n_tok = batch["out_mask"].sum().item()  # divides the loss: a scale, the same for every method

    def step():
        loss, _ = micro_batch_loss(student, teacher, batch, plan, None, n_tok, n_tok)
        loss.backward()
        student.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    mem, times, peak = MemoryMeter(device), [], 0
    for _ in range(repeats):
        mem.start()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peak = max(peak, mem.transient())
    return min(times), peak


def update_table(shape, sequences, prompt_len, response_len, device, methods=UPDATE_METHODS, chunks=(1024, 0),
                 repeats=3, peak_tflops=0.0, fsdp=True, checkpointing=True, verbose=True):
    """Every method's update at one shape, on one device: {method: {'chunked' | 'one_chunk': figures}}.

    The student holds fp32 weights; with fsdp it is sharded by distill.shard over a one-rank group (bf16
    compute on a GPU, fp32 on a CPU), as distill.py under torchrun. The teacher is in bf16 on a GPU (fp32 on a
    CPU), replicated. chunks: vocab_chunk_tokens per run, 0 = one chunk (every logit row of the batch at once).
    A run that fails (out of memory) records its error and the others go on. verbose: print each method's line.
    """
    from distill import make_plan, shard
    from model import ModelConfig
    cuda = device.type == "cuda"
    c = ModelConfig(**shape)
    student = random_model(shape, device, torch.float32, seed=0)
    teacher = random_model(shape, device, torch.bfloat16 if cuda else torch.float32, seed=1)
    teacher.eval().requires_grad_(False)
    student.activation_checkpointing = checkpointing
    batch = random_rollouts(sequences, prompt_len, response_len, shape["vocab_size"], device)
    T, rows = batch["idx"].shape[1], batch["out_mask"].sum().item()
    tokens = batch["attn"].sum().item()
    res = dict(shape=shape, shape_label=describe(shape), sequences=sequences, prompt_len=prompt_len,
               response_len=response_len, tokens_per_update=tokens, device=str(device),
               device_name=torch.cuda.get_device_name(device) if cuda else "cpu", fsdp=fsdp,
               activation_checkpointing=checkpointing, peak_tflops=peak_tflops or None,
               body_to_head=body_to_head(shape), body_to_head_with_attention=body_to_head(shape, T), methods={})
    with one_rank_group(device) if fsdp else contextlib.nullcontext():
        if fsdp:
            student = shard(student, device, torch.bfloat16 if cuda else torch.float32)
        for m in methods:
            res["methods"][m] = {}
            for chunk in chunks:
                plan = make_plan(m, c, c, layers="all", positions="last_k", k_positions=2000, topk=16,
                                 chunk=chunk or rows)
                model_flops, hw_flops = update_flops(plan, c, c, sequences, T, rows, checkpointing)
                r = res["methods"][m]["one_chunk" if chunk == 0 else "chunked"] = dict(
                    vocab_chunk_tokens=chunk or rows, model_tflop=model_flops / 1e12, hardware_tflop=hw_flops / 1e12)
                try:
                    seconds, transient = time_update(student, teacher, batch, plan, repeats, device)
                except Exception as e:  # e.g. out of memory in one chunk: keep the others
                    r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                if "error" in r:  # outside the except block, so the failed run's tensors can be freed
                    print(f"  update {m} (chunk {chunk or rows}) failed: {r['error']}", flush=True)
                    student.zero_grad(set_to_none=True)
                    if cuda:
                        torch.cuda.empty_cache()
                    continue
                r.update(seconds=seconds, transient_mb=transient / 2**20, tokens_per_s=tokens / seconds,
                         tflops=model_flops / seconds / 1e12)
                if peak_tflops:
                    r["mfu"] = r["tflops"] / peak_tflops
                    r["hfu"] = hw_flops / seconds / 1e12 / peak_tflops
            if verbose:
                print(method_line(m, res["methods"][m], "GB" if cuda else "MB"), flush=True)
    del student, teacher
    if cuda:
        torch.cuda.empty_cache()
    return res


def add_ratios(res):
    """Each method's speed-up and memory ratio against top-16 OPD in the same chunk setting; OPRD's against
    chunked top-16 at the top level."""
    for setting in ("chunked", "one_chunk"):
        base = res["methods"].get("opd_topk", {}).get(setting, {})
        for m, by in res["methods"].items():
            r = by.get(setting, {})
            if "seconds" in r and "seconds" in base:
                r["speedup_vs_topk"] = base["seconds"] / r["seconds"]
                # None when top-16 showed no transient peak: on a CPU the resident set's high-water mark can
                # already stand above the update's peak in a process that ran other work first
                r["mem_ratio_vs_topk"] = r["transient_mb"] / base["transient_mb"] if base["transient_mb"] else None
    oprd = res["methods"].get("oprd", {}).get("chunked", {})
    if "speedup_vs_topk" in oprd:
        res["oprd_speedup_vs_topk"] = oprd["speedup_vs_topk"]
        res["oprd_mem_ratio_vs_topk"] = oprd["mem_ratio_vs_topk"]
    one = res["methods"].get("opd_topk", {}).get("one_chunk", {})
    if "seconds" in oprd and "seconds" in one:  # against a top-16 that materialises the logits, as the paper's
        res["oprd_speedup_vs_topk_one_chunk"] = one["seconds"] / oprd["seconds"]
        res["oprd_mem_ratio_vs_topk_one_chunk"] = (oprd["transient_mb"] / one["transient_mb"]
                                                   if one["transient_mb"] else None)


def method_line(m, by, unit):
    """One method's figures on one line; GB = 2^30 bytes (as verl's, and the paper's, logs)."""
    scale, prec = (1 / 1024, 1) if unit == "GB" else (1.0, 0)
    parts = []
    for setting, r in by.items():
        if "error" in r:
            parts.append(f"{setting} failed")
            continue
        s = (f"{setting} (chunk {r['vocab_chunk_tokens']}): {r['seconds']:.2f} s, {r['tokens_per_s']:,.0f} tok/s, "
             f"{r['transient_mb'] * scale:,.{prec}f} {unit}")
        parts.append(s + (f", MFU {r['mfu']:.1%}" if "mfu" in r else f", {r['tflops'] * 1e3:.0f} GFLOP/s"))
    return f"  {m:>10}: " + " | ".join(parts)


def body_to_head_line(shape, T):
    return (f"  body:head FLOPs per token {body_to_head(shape):.2f}:1 (the weights' ratio; with attention over "
            f"{T:,} tokens {body_to_head(shape, T):.2f}:1)")


def ratio_line(res):
    if "oprd_speedup_vs_topk" not in res:
        return "  OPRD vs top-16 OPD: not measured"
    mem = lambda x: "? (top-16 showed no peak)" if x is None else f"{x:.2f}x"  # noqa: E731
    line = (f"  OPRD vs top-16 OPD (chunked): {res['oprd_speedup_vs_topk']:.2f}x faster, "
            f"{mem(res['oprd_mem_ratio_vs_topk'])} the transient memory")
    if "oprd_speedup_vs_topk_one_chunk" in res:
        line += (f"; vs top-16 in one chunk: {res['oprd_speedup_vs_topk_one_chunk']:.2f}x faster, "
                 f"{mem(res['oprd_mem_ratio_vs_topk_one_chunk'])} the memory")
    return line + " (paper, 8 x A100: 1.44x over the run, 0.46x)"


def update_cpu_shape(name, method, cfg):
    """A child process of bench_update: one method at one CPU shape, as distill.py runs on a CPU (FSDP2 fp32)."""
    b = CPU_BATCH
    return update_table(CPU_SHAPES[name], b["sequences"], b["prompt_len"], b["response_len"], torch.device("cpu"),
                        methods=(method,), chunks=(1024,), repeats=cfg["repeats"], verbose=False)


def bench_update(cfg, device):
    if device.type == "cuda":
        b, T = GPU_BATCH, GPU_BATCH["prompt_len"] + cfg["response_len"]
        print(f"update at the paper's shape: Qwen2.5-1.5B student and teacher ({describe(QWEN_1P5B)}, random "
              f"weights), {b['sequences']} x ({b['prompt_len']} + {cfg['response_len']:,}) tokens, all layers, "
              f"last 2000 positions, top-16, activation checkpointing, FSDP2 bf16 on one rank; MFU against "
              f"{cfg['peak_tflops']:.0f} TFLOP/s", flush=True)
        print(body_to_head_line(QWEN_1P5B, T), flush=True)
        res = update_table(QWEN_1P5B, b["sequences"], b["prompt_len"], cfg["response_len"], device,
                           repeats=cfg["repeats"], peak_tflops=cfg["peak_tflops"])
        res["label"] = f"paper shape: Qwen2.5-1.5B ({describe(QWEN_1P5B)})"
        add_ratios(res)
        print(ratio_line(res), flush=True)
        return res
    # CPU: each method in a fresh process (so one method's freed memory cannot hide another's peak), glibc told
    # to return every block above 64 KiB to the system, so the resident set follows live tensors
    import subprocess
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    b, out = CPU_BATCH, {}
    for name, shape in CPU_SHAPES.items():
        label = f"{name} ({describe(shape)})"
        print(f"update, {label}, {b['sequences']} x ({b['prompt_len']} + {b['response_len']}) tokens, fp32, "
              f"FSDP2 on one rank, activation checkpointing, each method in its own process", flush=True)
        print(body_to_head_line(shape, b["prompt_len"] + b["response_len"]), flush=True)
        res = None
        for m in UPDATE_METHODS:
            p = subprocess.run([sys.executable, __file__, f"--update_method={m}", f"--update_shape={name}",
                                f"--repeats={cfg['repeats']}", f"--threads={cfg['threads']}"],
                               capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise RuntimeError(f"update bench for {m} at {name} failed:\n{p.stderr[-3000:]}")
            r = jsonlib.loads(p.stdout.strip().splitlines()[-1])
            print(method_line(m, r["methods"][m], "MB"), flush=True)
            if res is None:
                res = r
            else:
                res["methods"].update(r["methods"])
        res["label"] = label
        add_ratios(res)
        print(ratio_line(res), flush=True)
        out[name] = res
    return out


# ----------------------------------------------------------------------------- sampler

SAMPLER_MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                     tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
SAMPLER_PROMPTS = dict(n_prompts=16, min_len=8, max_len=64, n=4, max_new_tokens=128)
GPU_SAMPLER_PROMPTS = dict(n_prompts=16, min_len=64, max_len=256, n=4, max_new_tokens=512)
SAMPLER_SETTINGS = {"rollout": dict(temperature=1.0, top_p=1.0),   # distill.py's rollouts (METHOD.md 5)
                    "eval": dict(temperature=0.7, top_p=0.95)}     # eval.py's protocol (METHOD.md 6)


def tiny_checkpoint(out_dir, seed=0):
    """A random Qwen3 saved by transformers (no tokenizer: everything here works on token ids)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    Qwen3ForCausalLM(Qwen3Config(**SAMPLER_MODEL)).to(torch.float32).save_pretrained(out_dir)
    return out_dir


def random_prompts(s, vocab):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(s["min_len"], s["max_len"] + 1, (s["n_prompts"],), generator=g).tolist()
    return [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens]


def hf_generate_fn(hf, prompts, s, device):
    """generate() on left-padded prompts: a function (settings, new tokens) -> None."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as generate() wants for a decoder-only model
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)

    def run(st, new):
        with torch.inference_mode():  # top_k=0: generate() would apply its default top-k of 50
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, pad_token_id=0,
                              max_new_tokens=new, num_return_sequences=s["n"], **st)
        assert out[:, T:].numel() == len(prompts) * s["n"] * new
    return run


def torch_sampler_fn(sampler, prompts, s):
    def run(st, new):
        out = sampler.generate(prompts, n=s["n"], max_new_tokens=new, stop_ids=[], **st)
        assert sum(len(x.tokens) for r in out for x in r) == len(prompts) * s["n"] * new
    return run


def sampler_lines(res, runs):
    for name in SAMPLER_SETTINGS:
        r = res[name]
        base = r.get("hf_generate_tok_s")
        line = f"sampler [{name}: T={r['settings']['temperature']}, top_p={r['settings']['top_p']}] tokens/s: "
        line += ", ".join(f"{who} {r[who + '_tok_s']:,.0f}" for who in runs if who + "_tok_s" in r)
        if base:
            for who in runs:
                if who != "hf_generate" and who + "_tok_s" in r:
                    r[f"{who}_over_hf"] = r[who + "_tok_s"] / base
            line += " | over generate(): " + ", ".join(f"{who} {r[who + '_over_hf']:.2f}x" for who in runs
                                                       if who + "_over_hf" in r) + " (goal: torch >= 2x)"
        print(line, flush=True)


def bench_sampler(cfg, device):
    return sampler_gpu(cfg, device) if device.type == "cuda" else sampler_cpu(cfg)


def sampler_gpu(cfg, device):
    """The 1.5B shape in bf16, 64 sequences x 512 new tokens: torch sampler (eager, CUDA graphs) vs generate().
    One full-length warm-up per generator (so CUDA graphs are captured at the timed shapes), then one timed
    run per setting."""
    from rollout import TorchSampler
    s = GPU_SAMPLER_PROMPTS
    prompts = random_prompts(s, QWEN_1P5B["vocab_size"])
    n_tokens = s["n_prompts"] * s["n"] * s["max_new_tokens"]
    res = dict(model=f"Qwen2.5-1.5B shape ({describe(QWEN_1P5B)}), random weights, bf16", prompts=s,
               tokens_per_run=n_tokens, errors={})
    ours = random_model(QWEN_1P5B, device, torch.bfloat16, seed=0).eval()
    samplers = {"torch": {}}  # name -> TorchSampler arguments
    if "decode" in inspect.signature(TorchSampler.__init__).parameters:
        samplers = {"torch_eager": dict(decode="eager"), "torch_graph": dict(decode="graph")}
    else:
        res["note"] = "rollout.TorchSampler takes no decode argument: one torch row"
    runs = {"hf_generate": hf_generate_fn(hf_copy(ours), prompts, s, device)}
    for who, kw in samplers.items():  # CUDA graphs last: a failed capture can leave the device unusable after it
        try:
            runs[who] = torch_sampler_fn(TorchSampler(model=ours, **kw), prompts, s)
        except Exception as e:
            res["errors"][who] = f"{type(e).__name__}: {e}"
    for name, st in SAMPLER_SETTINGS.items():
        res[name] = dict(settings=st)
    for who, run in runs.items():
        try:
            run(SAMPLER_SETTINGS["rollout"], s["max_new_tokens"])  # warm-up
            for name, st in SAMPLER_SETTINGS.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                run(st, s["max_new_tokens"])
                torch.cuda.synchronize()
                res[name][f"{who}_tok_s"] = n_tokens / (time.perf_counter() - t0)
        except Exception as e:
            res["errors"][who] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"sampler {who} failed: {res['errors'][who]}", flush=True)
    sampler_lines(res, runs)
    return res


def sampler_cpu(cfg):
    from transformers import AutoModelForCausalLM
    from model import Transformer
    from rollout import TorchSampler, VLLMSampler, vllm_available
    s = SAMPLER_PROMPTS
    prompts = random_prompts(s, SAMPLER_MODEL["vocab_size"])
    n_tokens = s["n_prompts"] * s["n"] * s["max_new_tokens"]
    res = dict(model=SAMPLER_MODEL, prompts=s, tokens_per_run=n_tokens, torch_threads=torch.get_num_threads())
    path = tiny_checkpoint(tempfile.mkdtemp(prefix="bench_sampler_"))
    new_tokens = lambda warmup: 8 if warmup else s["max_new_tokens"]  # noqa: E731

    # the generators, each a function (settings, new tokens) -> None
    sampler = TorchSampler(model=Transformer.from_pretrained(path).eval())  # sets flush-denormal on CPU
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runs = {"torch": torch_sampler_fn(sampler, prompts, s), "hf_generate": hf_generate_fn(hf, prompts, s, "cpu")}
    engine = None
    if cfg["with_vllm"] and vllm_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        t0 = time.perf_counter()
        engine = VLLMSampler(path, dtype="float32")  # the engine as rollouts use it (compiled, not eager)
        res["vllm_start_s"] = time.perf_counter() - t0
        runs["vllm"] = torch_sampler_fn(engine, prompts, s)  # the same generate() interface

    for name, st in SAMPLER_SETTINGS.items():
        r = res[name] = dict(settings=st)
        for who, run in runs.items():
            r[f"{who}_tok_s"] = n_tokens / best_time(lambda warmup: run(st, new_tokens(warmup)), cfg["repeats"])
        if "vllm_tok_s" in r:
            r["vllm_over_torch"] = r["vllm_tok_s"] / r["torch_tok_s"]
    sampler_lines(res, runs)
    if engine is not None:
        engine.close()
    shutil.rmtree(path, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- model.py forward vs transformers

def bench_forward(cfg, device):
    return forward_gpu(cfg, device) if device.type == "cuda" else forward_cpu(cfg)


def forward_gpu(cfg, device):
    """The 1.5B shape in bf16: forward (4 x 4096 tokens, no grad) and forward + backward (1 x 4096)."""
    ours = random_model(QWEN_1P5B, device, torch.bfloat16, seed=0)
    hf = hf_copy(ours)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, min(QWEN_1P5B["vocab_size"], 151665), (4, 4096), generator=g).to(device)
    taps = range(1, QWEN_1P5B["num_hidden_layers"] + 1)
    t = lambda fn: best_time(lambda warmup: fn(), cfg["repeats"], device)  # noqa: E731
    with torch.inference_mode():
        t_ours, t_hf, t_taps = t(lambda: ours(idx)), t(lambda: hf(idx).logits), t(lambda: ours(idx, taps=taps))

    def fwd_bwd(model, logits_of):
        logits_of(model(idx[:1])).float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
    t_ours_fb, t_hf_fb = t(lambda: fwd_bwd(ours, lambda x: x)), t(lambda: fwd_bwd(hf, lambda x: x.logits))
    res = dict(model=f"Qwen2.5-1.5B shape ({describe(QWEN_1P5B)}), random weights, bf16",
               ours_s=t_ours, hf_s=t_hf, taps_s=t_taps, ours_over_hf=t_hf / t_ours, taps_over_logits=t_ours / t_taps,
               ours_fwd_bwd_s=t_ours_fb, hf_fwd_bwd_s=t_hf_fb, ours_over_hf_fwd_bwd=t_hf_fb / t_ours_fb)
    print(f"forward (1.5B shape, bf16, 4 x 4096 tokens): model.py {t_ours * 1e3:.0f} ms, transformers "
          f"{t_hf * 1e3:.0f} ms -> {res['ours_over_hf']:.2f}x; all taps without the LM head {t_taps * 1e3:.0f} ms "
          f"({res['taps_over_logits']:.2f}x faster than logits); forward + backward (1 x 4096): model.py "
          f"{t_ours_fb * 1e3:.0f} ms, transformers {t_hf_fb * 1e3:.0f} ms -> {res['ours_over_hf_fwd_bwd']:.2f}x",
          flush=True)
    del ours, hf
    torch.cuda.empty_cache()
    return res


def forward_cpu(cfg):
    """model.py's forward against transformers' on the same weights (fp32, batch 8 x 256 tokens, no grad)."""
    from transformers import AutoModelForCausalLM
    from model import Transformer
    path = tiny_checkpoint(tempfile.mkdtemp(prefix="bench_forward_"))
    ours = Transformer.from_pretrained(path).eval()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    idx = torch.randint(0, SAMPLER_MODEL["vocab_size"], (8, 256), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t_ours = best_time(lambda warmup: ours(idx), cfg["repeats"])
        t_hf = best_time(lambda warmup: hf(idx), cfg["repeats"])
        t_taps = best_time(lambda warmup: ours(idx, taps=range(1, SAMPLER_MODEL["num_hidden_layers"] + 1)),
                           cfg["repeats"])
    shutil.rmtree(path, ignore_errors=True)
    res = dict(ours_s=t_ours, hf_s=t_hf, taps_s=t_taps, ours_over_hf=t_hf / t_ours, taps_over_logits=t_ours / t_taps)
    print(f"forward (8 x 256 tokens): model.py {t_ours * 1e3:.1f} ms, transformers {t_hf * 1e3:.1f} ms "
          f"-> {res['ours_over_hf']:.2f}x; all taps without the LM head {t_taps * 1e3:.1f} ms "
          f"({res['taps_over_logits']:.2f}x faster than logits)")
    return res


# ----------------------------------------------------------------------------- gradient variance per method

VARIANCE_METHODS = ("oprd", "opd", "opd_topk", "opd_full")


def bench_variance(cfg, device):
    """The paper's variance argument, measured: R rollouts of the same prompts from the same weights, each
    method's full gradient on each rollout, and its relative variance E||g - mean g||^2 / ||mean g||^2
    (SNR = its inverse). Uses tiny.py's teacher and student when they exist, else a random pair. CPU always.

    Every method here sees the same R rollouts, so the rollout noise is common to all of them; what differs is
    the estimator: OPRD's and full-KL's gradients are exact given the rollout, sampled-token OPD's is a
    one-sample REINFORCE estimate whose noise does not vanish, top-k's a truncated one.
    """
    from distill import collate, make_plan, micro_batch_loss
    from model import Transformer
    from rollout import TorchSampler
    from tokenizer import load_tokenizer
    import eval as evaluation
    R, n_prompts = cfg["variance_rollouts"], 8
    if os.path.isfile("tiny/teacher/config.json") and os.path.isfile("tiny/student/config.json"):
        t_path, s_path = "tiny/teacher", "tiny/student"
        tok = load_tokenizer(s_path)
        prompts = [tok.chat(evaluation.build_prompt(p)) for p in evaluation.load_problems("tiny_train")[:n_prompts]]
        stop = tok.eos_ids
    else:
        t_path = tiny_checkpoint(tempfile.mkdtemp(prefix="bench_var_t_"))
        s_path = tiny_checkpoint(tempfile.mkdtemp(prefix="bench_var_s_"), seed=1)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, SAMPLER_MODEL["vocab_size"], (16,), generator=g).tolist() for _ in range(n_prompts)]
        stop = []
    student, teacher = Transformer.from_pretrained(s_path), Transformer.from_pretrained(t_path).requires_grad_(False)
    sampler = TorchSampler(model=student)
    grads = {m: [] for m in VARIANCE_METHODS}
    for r in range(R):
        samples = sampler.generate(prompts, n=2, temperature=1.0, max_new_tokens=48, stop_ids=stop, seed=1000 + r)
        seqs = [(p, s.tokens, s.finish) for p, ss in zip(prompts, samples) for s in ss]
        batch = collate(seqs, 0, torch.device("cpu"))
        n_tok = batch["out_mask"].sum().item()
        for m in VARIANCE_METHODS:
            plan = make_plan(m, student.config, teacher.config, layers="all", positions="all", topk=16)
            loss, _ = micro_batch_loss(student, teacher, batch, plan, None, n_tok, n_tok)
            loss.backward()
            grads[m].append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
            student.zero_grad(set_to_none=True)
    res = dict(rollouts=R, prompts=n_prompts, models=[t_path, s_path], methods={})
    for m, gs in grads.items():
        G = torch.stack(gs).double()
        mean = G.mean(0)
        rel_var = ((G - mean).pow(2).sum(1).mean() / mean.pow(2).sum()).item()
        res["methods"][m] = dict(relative_variance=rel_var, snr=1 / rel_var)
    line = ", ".join(f"{m} {r['snr']:.3g}" for m, r in res["methods"].items())
    print(f"gradient SNR over {R} rollouts of the same {n_prompts} prompts (higher = less noise): {line}")
    return res


SECTIONS = {"update": bench_update, "forward": bench_forward, "sampler": bench_sampler, "variance": bench_variance}


# ----------------------------------------------------------------------------- main

def main():
    from configurator import ConfigError, apply_config
    try:
        cfg = apply_config(sys.argv[1:], CONFIG, help_source=__file__)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for key, ok, want in (("repeats", cfg["repeats"] >= 1, ">= 1"), ("response_len", cfg["response_len"] >= 1, ">= 1"),
                          ("variance_rollouts", cfg["variance_rollouts"] >= 2, ">= 2"),
                          ("peak_tflops", cfg["peak_tflops"] > 0, "> 0"), ("threads", cfg["threads"] >= 0, ">= 0")):
        if not ok:
            print(f"error: {key}={cfg[key]!r}: must be {want}", file=sys.stderr)
            sys.exit(2)
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    if cfg["update_method"]:  # a child of bench_update: one method at one CPU shape, a fresh process
        torch.set_flush_denormal(True)
        print(jsonlib.dumps(update_cpu_shape(cfg["update_shape"], cfg["update_method"], cfg)))
        return
    if cfg["device"] not in ("auto", "cuda", "cpu"):
        print(f"error: device={cfg['device']!r}: expected auto, cuda or cpu", file=sys.stderr)
        sys.exit(2)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        print("error: device=cuda but torch sees no GPU", file=sys.stderr)
        sys.exit(2)
    on_gpu = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if cfg["sections"] == "all":  # on a GPU every section that uses it (variance measures estimators: a CPU's job)
        names = [s for s in SECTIONS if device.type == "cpu" or s != "variance"]
    else:
        names = [s.strip() for s in cfg["sections"].split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {unknown}; known: {list(SECTIONS)}", file=sys.stderr)
        sys.exit(2)
    results = dict(machine=dict(device=str(device), cpus=os.cpu_count(), torch=torch.__version__,
                                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                load_average_at_start=os.getloadavg()[0]))
    t_start = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            results[name] = SECTIONS[name](cfg, device)
        except Exception as e:  # one failing section: its error, and the others still run
            traceback.print_exc()
            print(f"section {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            results[name] = dict(error=f"{type(e).__name__}: {e}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results[name + "_seconds"] = time.perf_counter() - t0
        print(f"({name}: {results[name + '_seconds']:.0f} s)", flush=True)
        # the headline ratios, at the top level: the paper shape on a GPU, the paper-proportioned shape on a CPU
        upd = results.get("update", {})
        upd = upd.get("paper-proportioned", upd)
        for k in ("oprd_speedup_vs_topk", "oprd_mem_ratio_vs_topk"):
            if k in upd:
                results[k] = upd[k]
        results["machine"]["load_average_at_end"] = os.getloadavg()[0]
        results["total_seconds"] = time.perf_counter() - t_start
        if cfg["json"]:  # after every section, so a run cut short keeps what it measured
            with open(cfg["json"], "w") as f:
                jsonlib.dump(results, f, indent=2)
    if cfg["json"]:
        print(f"wrote {cfg['json']} ({results['total_seconds']:.0f} s in all)")


if __name__ == "__main__":  # the guard matters: vLLM's engine starts worker processes by spawning
    main()
