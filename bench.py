"""
Benchmarks: one section per function, each returning its figures; all printed as measured, and written to a
JSON file with --json.

$ python bench.py                                     # every section
$ python bench.py --sections=sampler --json=bench.json
$ python bench.py --sections=sampler --with_vllm=False --repeats=5

Sections
- sampler: generated tokens per second of rollout.py's torch sampler, transformers' generate() and the vLLM
  engine (the CPU build on a CPU machine), side by side in one run: one tiny random Qwen3, the same prompts
  (16 prompts x 4 samples x 128 new tokens, no stop token so every row runs to the end), under two settings:
  rollouts (temperature 1) and eval (temperature 0.7, top-p 0.95). Goal: the torch sampler >= 2x generate().
- forward: model.py's forward against transformers' on the same weights, and the same forward with taps only
  (no LM head).
- update: one training update (teacher forward, student forward + backward) per method on the same rollouts, at
  Qwen's vocabulary (151,936) with a small hidden size, so the LM head weighs as in the paper: seconds and
  transient peak memory (peak during the update minus memory at its start, the paper's Table 3), as ratios to
  top-16 OPD. Each method runs in a fresh process. Goal: OPRD >= 2x faster, <= 0.35x the memory.
- variance: each method's gradient over repeated rollouts of the same prompts from the same weights: its
  relative variance and signal-to-noise ratio.

`--json FILE` writes every figure, with the headline keys oprd_speedup_vs_topk and oprd_mem_ratio_vs_topk at
the top level. Timings are the best of `repeats` runs after a warm-up. Other processes competing for the cores
hurt every figure (CPU threads spin-wait on each other), so the load average is recorded alongside.
"""
import json as jsonlib
import os
import shutil
import sys
import tempfile
import time

import torch

CONFIG = dict(
    sections="all",   # comma-separated section names, or 'all'
    json="",          # write every figure to this file
    repeats=3,        # timed runs per measurement (best kept)
    with_vllm=True,   # include vLLM in the sampler section (if it imports)
    threads=0,        # torch CPU threads for the in-process runs; 0 = torch's default
    variance_rollouts=8,  # rollouts per method in the variance section
    update_method="", # internal: time one update of this method in this process, print it as JSON
)


def best_time(fn, repeats):
    """Best wall time of `repeats` calls of fn(warmup=False), after one fn(warmup=True)."""
    fn(warmup=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(warmup=False)
        times.append(time.perf_counter() - t0)
    return min(times)


# ----------------------------------------------------------------------------- sampler

SAMPLER_MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                     tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
SAMPLER_PROMPTS = dict(n_prompts=16, min_len=8, max_len=64, n=4, max_new_tokens=128)
SAMPLER_SETTINGS = {"rollout": dict(temperature=1.0, top_p=1.0),   # distill.py's rollouts (METHOD.md 5)
                    "eval": dict(temperature=0.7, top_p=0.95)}     # eval.py's protocol (METHOD.md 6)


def tiny_checkpoint(out_dir, seed=0):
    """A random Qwen3 saved by transformers (no tokenizer: everything here works on token ids)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    Qwen3ForCausalLM(Qwen3Config(**SAMPLER_MODEL)).to(torch.float32).save_pretrained(out_dir)
    return out_dir


def bench_sampler(cfg):
    from transformers import AutoModelForCausalLM
    from model import Transformer
    from rollout import TorchSampler, VLLMSampler, vllm_available
    s = SAMPLER_PROMPTS
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(s["min_len"], s["max_len"] + 1, (s["n_prompts"],), generator=g).tolist()
    prompts = [torch.randint(0, SAMPLER_MODEL["vocab_size"], (L,), generator=g).tolist() for L in lens]
    n_tokens = s["n_prompts"] * s["n"] * s["max_new_tokens"]
    res = dict(model=SAMPLER_MODEL, prompts=s, tokens_per_run=n_tokens, torch_threads=torch.get_num_threads())
    path = tiny_checkpoint(tempfile.mkdtemp(prefix="bench_sampler_"))
    new_tokens = lambda warmup: 8 if warmup else s["max_new_tokens"]  # noqa: E731

    # the three generators, each a function (settings, warmup) -> None
    sampler = TorchSampler(model=Transformer.from_pretrained(path).eval())  # sets flush-denormal on CPU

    def run_torch(st, warmup):
        out = sampler.generate(prompts, n=s["n"], max_new_tokens=new_tokens(warmup), stop_ids=[], **st)
        assert warmup or sum(len(x.tokens) for r in out for x in r) == n_tokens

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    T = max(lens)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as generate() wants for a decoder-only model
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1

    def run_hf(st, warmup):
        with torch.inference_mode():  # top_k=0: generate() would apply its default top-k of 50
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, pad_token_id=0,
                              max_new_tokens=new_tokens(warmup), num_return_sequences=s["n"], **st)
        assert warmup or out[:, T:].numel() == n_tokens

    runs = {"torch": run_torch, "hf_generate": run_hf}
    engine = None
    if cfg["with_vllm"] and vllm_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        t0 = time.perf_counter()
        engine = VLLMSampler(path, dtype="float32")  # the engine as rollouts use it (compiled, not eager)
        res["vllm_start_s"] = time.perf_counter() - t0

        def run_vllm(st, warmup):
            out = engine.generate(prompts, n=s["n"], max_new_tokens=new_tokens(warmup), stop_ids=[], **st)
            assert warmup or sum(len(x.tokens) for r in out for x in r) == n_tokens
        runs["vllm"] = run_vllm

    for name, st in SAMPLER_SETTINGS.items():
        r = res[name] = dict(settings=st)
        for who, run in runs.items():
            r[f"{who}_tok_s"] = n_tokens / best_time(lambda warmup: run(st, warmup), cfg["repeats"])
        r["torch_over_hf"] = r["torch_tok_s"] / r["hf_generate_tok_s"]
        line = (f"sampler [{name}: T={st['temperature']}, top_p={st['top_p']}] tokens/s: torch {r['torch_tok_s']:.0f}, "
                f"generate() {r['hf_generate_tok_s']:.0f}")
        if "vllm_tok_s" in r:
            r["vllm_over_hf"] = r["vllm_tok_s"] / r["hf_generate_tok_s"]
            r["vllm_over_torch"] = r["vllm_tok_s"] / r["torch_tok_s"]
            line += f", vLLM {r['vllm_tok_s']:.0f}"
        line += f" | torch/generate {r['torch_over_hf']:.2f}x (goal >= 2x)"
        if "vllm_tok_s" in r:
            line += f", vLLM/generate {r['vllm_over_hf']:.2f}x, vLLM/torch {r['vllm_over_torch']:.2f}x"
        print(line)
    if engine is not None:
        engine.close()
    shutil.rmtree(path, ignore_errors=True)
    return res


# ----------------------------------------------------------------------------- model.py forward vs transformers

def bench_forward(cfg):
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


# ----------------------------------------------------------------------------- update cost per method

UPDATE_MODEL = dict(vocab_size=151936, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64)
UPDATE_BATCH = dict(sequences=4, prompt_len=128, response_len=896)
UPDATE_METHODS = ("oprd", "opd", "opd_topk", "opd_full", "opd+oprd")


def update_once(method, cfg):
    """One training update (teacher forward, student forward + backward) on fixed rollouts, in this process.

    Returns seconds (best of cfg['repeats'] after a first run) and the first run's transient peak memory.
    """
    from distill import MemoryMeter, collate, make_plan, micro_batch_loss
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg_m = ModelConfig(model_type="qwen3", tie_word_embeddings=False, **UPDATE_MODEL)
    student, teacher = Transformer(cfg_m), Transformer(cfg_m).requires_grad_(False)
    b = UPDATE_BATCH
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(0, 151000, (b["prompt_len"],), generator=g).tolist(),
             torch.randint(0, 151000, (b["response_len"],), generator=g).tolist(), "stop")
            for _ in range(b["sequences"])]
    batch = collate(seqs, 0, torch.device("cpu"))
    # the paper's settings: all layers, the last 2000 positions (here: every response position), top-16
    plan = make_plan(method, cfg_m, cfg_m, layers="all", positions="last_k", k_positions=2000, topk=16,
                     chunk=1024)
    n_out = batch["out_mask"].sum().item()
    n_rep = n_out

    def step():
        loss, _ = micro_batch_loss(student, teacher, batch, plan, None, n_out, n_rep)
        loss.backward()
        student.zero_grad(set_to_none=True)

    mem = MemoryMeter(torch.device("cpu"))
    mem.start()
    step()
    transient = mem.transient()
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(seconds=min(times), transient_mb=transient / 2**20)


def bench_update(cfg):
    """Each method in a fresh process (so one method's freed memory cannot hide another's peak), glibc told to
    return every block above 64 KiB to the system, so the resident set follows live tensors."""
    import subprocess
    res = dict(model=UPDATE_MODEL, batch=UPDATE_BATCH, methods={})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for m in UPDATE_METHODS:
        p = subprocess.run([sys.executable, __file__, f"--update_method={m}", f"--repeats={cfg['repeats']}",
                            f"--threads={cfg['threads']}"], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"update bench for {m} failed:\n{p.stderr[-3000:]}")
        res["methods"][m] = jsonlib.loads(p.stdout.strip().splitlines()[-1])
        print(f"  update {m:>10}: {res['methods'][m]['seconds']:.2f} s, transient "
              f"{res['methods'][m]['transient_mb']:.0f} MB", flush=True)
    base = res["methods"]["opd_topk"]
    for m, r in res["methods"].items():
        r["speedup_vs_topk"] = base["seconds"] / r["seconds"]
        r["mem_ratio_vs_topk"] = r["transient_mb"] / base["transient_mb"]
    res["oprd_speedup_vs_topk"] = res["methods"]["oprd"]["speedup_vs_topk"]
    res["oprd_mem_ratio_vs_topk"] = res["methods"]["oprd"]["mem_ratio_vs_topk"]
    print(f"  OPRD vs top-16 OPD: {res['oprd_speedup_vs_topk']:.2f}x faster, "
          f"{res['oprd_mem_ratio_vs_topk']:.2f}x the transient memory (goal: >= 2x, <= 0.35x; paper 1.44x, 0.46x)")
    return res


# ----------------------------------------------------------------------------- gradient variance per method

VARIANCE_METHODS = ("oprd", "opd", "opd_topk", "opd_full")


def bench_variance(cfg):
    """The paper's variance argument, measured: R rollouts of the same prompts from the same weights, each
    method's full gradient on each rollout, and its relative variance E||g - mean g||^2 / ||mean g||^2
    (SNR = its inverse). Uses tiny.py's teacher and student when they exist, else a random pair.

    Every method here sees the same R rollouts, so the rollout noise is common to all of them; what differs is
    the estimator: OPRD's and full-KL's gradients are exact given the rollout, sampled-token OPD's is a
    one-sample REINFORCE estimate whose noise does not vanish, top-k's a truncated one.
    """
    from distill import collate, make_plan, micro_batch_loss
    from model import Transformer
    from rollout import TorchSampler, load_tokenizer
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


SECTIONS = {"sampler": bench_sampler, "forward": bench_forward, "update": bench_update,
            "variance": bench_variance}


# ----------------------------------------------------------------------------- main

def main():
    from configurator import ConfigError, apply_config
    try:
        cfg = apply_config(sys.argv[1:], CONFIG)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    if cfg["update_method"]:  # a child of bench_update: one method, a fresh process
        torch.set_flush_denormal(True)
        print(jsonlib.dumps(update_once(cfg["update_method"], cfg)))
        return
    names = list(SECTIONS) if cfg["sections"] == "all" else [s.strip() for s in cfg["sections"].split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {unknown}; known: {list(SECTIONS)}", file=sys.stderr)
        sys.exit(2)
    results = dict(machine=dict(device="cuda" if torch.cuda.is_available() else "cpu", cpus=os.cpu_count(),
                                torch=torch.__version__, load_average_at_start=os.getloadavg()[0]))
    for name in names:
        results[name] = SECTIONS[name](cfg)
    if "update" in results:  # the headline ratios, at the top level
        results["oprd_speedup_vs_topk"] = results["update"]["oprd_speedup_vs_topk"]
        results["oprd_mem_ratio_vs_topk"] = results["update"]["oprd_mem_ratio_vs_topk"]
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    if cfg["json"]:
        with open(cfg["json"], "w") as f:
            jsonlib.dump(results, f, indent=2)
        print(f"wrote {cfg['json']}")


if __name__ == "__main__":  # the guard matters: vLLM's engine starts worker processes by spawning
    main()
