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

Timings are the best of `repeats` runs after a warm-up. Other processes competing for the cores hurt every
figure (CPU threads spin-wait on each other), so the load average is recorded alongside.
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


def tiny_checkpoint(out_dir):
    """A random Qwen3 saved by transformers (no tokenizer: everything here works on token ids)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
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


SECTIONS = {"sampler": bench_sampler}


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
    names = list(SECTIONS) if cfg["sections"] == "all" else [s.strip() for s in cfg["sections"].split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {unknown}; known: {list(SECTIONS)}", file=sys.stderr)
        sys.exit(2)
    results = dict(machine=dict(device="cuda" if torch.cuda.is_available() else "cpu", cpus=os.cpu_count(),
                                torch=torch.__version__, load_average_at_start=os.getloadavg()[0]))
    for name in names:
        results[name] = SECTIONS[name](cfg)
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    if cfg["json"]:
        with open(cfg["json"], "w") as f:
            jsonlib.dump(results, f, indent=2)
        print(f"wrote {cfg['json']}")


if __name__ == "__main__":  # the guard matters: vLLM's engine starts worker processes by spawning
    main()
