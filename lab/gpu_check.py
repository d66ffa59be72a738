"""
A first-run check for a GPU node, in a few minutes: it makes a tiny model on the spot, then checks
each sampler backend the way distill.py and eval.py use it.

$ make gpu                                     # HF_HUB_OFFLINE=1 .venv/bin/python -m lab.gpu_check
$ python -m lab.gpu_check --backends=torch     # without vLLM
$ python -m lab.gpu_check --device=cpu         # the CPU parts (tests/test_gpu_check.py runs them)

The model: transformers' Qwen3 (2 layers, d = 128, 2 query heads of head_dim 64 on one kv head, tied
embeddings) that speaks the built-in byte-level tokenizer, saved twice with other random weights, as
a student and a teacher. Then, per backend (torch always; vLLM where it imports and runs on the
device):
- weight_sync: a sampler on the student samples, takes the teacher's weights through update_weights
  (streamed by fsdp_named_tensors from model.py's Transformer, the trainer's model) and samples
  again. The log-probs it reports for its tokens must be the trainer's: mean |difference| at most
  logp_tol (on a GPU a bf16 sampler against the fp32 trainer). The same gap to the old weights is
  printed beside it; a sync that never reached the engine fails with that gap.
- graph_vs_eager (torch, CUDA only): decode='graph' gives decode='eager''s tokens, in fp32, so
  that rounding cannot split a near-tie.
- distill, eval: distill.py trains the student 2 steps toward the teacher with OPRD (its own
  check of the sampler's log-probs on), then eval.py evaluates the checkpoint it saved on 8
  problems of the tiny task; one rank as a plain process, then two ranks under torchrun where 2 or
  more GPUs are visible, and there distill.py again with 1 trainer rank + 1 sampler rank
  (rollout_ranks=1, config/qwen_async.py's set-up: the engine a world of its own, the weights sent
  to it after each step).
Each check prints `ok   <name>  <detail>`; the first failure prints `FAILED <name>: <reason>`
and exits 1. Memory follows a check as `mem  <name>  ...`: this process's torch peaks on a GPU,
and for a run the KV-cache, sleep and CUDA-graph-pool lines vLLM logs at VLLM_LOGGING_LEVEL=INFO
and distill.py's logged transient peak.
"""
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import data
import rollout
from configurator import configure
from model import Transformer, checkpoints_in
from sampler import TorchSampler
from tokenizer import ByteTokenizer, mark_byte_tokenizer

# -----------------------------------------------------------------------------
device = 'auto'               # auto (cuda if there is one) | cuda | cpu (no graphs, one rank)
backends = 'torch,vllm'       # samplers to check; vllm is skipped, with why, where it cannot run
work_dir = ''                 # models, runs and logs; '' = a temporary folder, removed if all pass
logp_tol = 0.1                # weight_sync: the most mean |sampler log p - trainer log p| allowed
                              # (bf16 against fp32: about 0.015; the old weights: about 1.7)
timeout = 600                 # seconds each distill.py or eval.py run may take
# -----------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tiny model; head_dim 64 is one vLLM's attention kernels take. Weights are drawn at std 0.1
# (transformers' default is 0.02), so that log-probs are far from uniform and two draws far apart
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
             tie_word_embeddings=True, initializer_range=0.1, rms_norm_eps=1e-6)
# what vLLM logs about its memory: the KV cache, sleep mode, CUDA graphs, the weights
VLLM_MEMORY = re.compile(r"KV cache (memory|size)|GiB for KV cache|Sleep mode freed|fall asleep|"
                         r"CUDA graph pool|Graph capturing finished|Model loading took|"
                         r"CuMemAllocator")


class CheckFailed(Exception):
    """Why a check failed: the reason on its FAILED line."""


def one_line(text, limit=300):
    return ' '.join(str(text).split())[:limit]


# ----------------------------------------------------------------------------- the tiny model

def make_model(path, seed):
    """A tiny random Qwen3 made by transformers (Qwen3Config, save_pretrained) and marked to speak
    the byte tokenizer; its norms are moved off 1, so that every parameter changes a log-prob."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    tok = ByteTokenizer()
    config = Qwen3Config(vocab_size=tok.vocab_size, eos_token_id=tok.eos_ids,
                         pad_token_id=tok.pad_id, bos_token_id=None, **SHAPE)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    mark_byte_tokenizer(path)


def check_tiny_model(dev, student, teacher):
    make_model(student, seed=0)
    make_model(teacher, seed=1)
    model = Transformer.from_pretrained(student)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    detail = (f"student and teacher: {c.model_type}, {c.num_hidden_layers} layers, "
              f"d = {c.hidden_size}, head_dim {c.head_dim}, vocab {c.vocab_size}, "
              f"{n_params:,} parameters")
    return detail, []


def tiny_prompts(n):
    """The first n prompts of the tiny task, as token ids of the byte tokenizer's chat."""
    tok = ByteTokenizer()
    return [data.encode_prompt(p, tok) for p in data.load_problems('tiny')[:n]]


@torch.no_grad()
def trainer_logprobs(model, prompt, tokens):
    """model's log-probability of each of `tokens` after `prompt` (an fp32 log-softmax), as a
    (len(tokens),) tensor."""
    ids = torch.tensor([prompt + tokens], device=next(model.parameters()).device)
    logits = model(ids)[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0]


def torch_peaks(dev):
    """This process's CUDA memory peaks since the check began (a vLLM engine core in a process of
    its own is not counted: its lines come from the runs)."""
    if dev.type != 'cuda':
        return []
    allocated = torch.cuda.max_memory_allocated(dev) / 2**20
    reserved = torch.cuda.max_memory_reserved(dev) / 2**20
    return [f"torch max allocated {allocated:.0f} MiB, max reserved {reserved:.0f} MiB"]


# ----------------------------------------------------------------------------- the checks

def check_weight_sync(dev, backend, student, teacher):
    trainer = Transformer.from_pretrained(teacher, dtype=torch.float32, device=dev)
    old = Transformer.from_pretrained(student, dtype=torch.float32, device=dev)
    # the engine as distill.py starts it (CPU: no compilation)
    sampler = rollout.make_sampler(backend, student, device=dev, seed=0, max_model_len=512,
                                   enforce_eager=dev.type == 'cpu')
    prompts = tiny_prompts(4)
    args = dict(n=2, temperature=1.0, max_new_tokens=32, stop_ids=[], logprobs=True)
    try:
        # a rollout of the old weights first: caches, CUDA graphs and vLLM's prefix cache hold them
        sampler.generate(prompts, seed=1, **args)
        # as during a training step: asleep while the trainer updates, then the new weights
        sampler.sleep()
        sampler.update_weights(rollout.fsdp_named_tensors(trainer))
        out = sampler.generate(prompts, seed=2, **args)
    finally:
        sampler.close()
    to_new, to_old = [], []
    for prompt, samples in zip(prompts, out):
        for s in samples:
            reported = torch.tensor(s.logprobs, device=dev)
            to_new.append((reported - trainer_logprobs(trainer, prompt, s.tokens)).abs())
            to_old.append((reported - trainer_logprobs(old, prompt, s.tokens)).abs())
    to_new = torch.cat(to_new)
    gap = to_new.mean().item()
    old_gap = torch.cat(to_old).mean().item()
    if not gap <= logp_tol:
        why = ": the new weights did not reach the engine" if old_gap < gap else ""
        raise CheckFailed(f"the sampler's log-probs differ from the trainer's by {gap:.4f} on "
                          f"average (tolerance {logp_tol}), from the old weights' by "
                          f"{old_gap:.4f}{why}")
    detail = (f"{len(to_new)} sampled tokens: mean |d log p| to the trainer {gap:.1e} "
              f"(max {to_new.max().item():.1e}, tolerance {logp_tol}); to the old weights "
              f"{old_gap:.2f}")
    return detail, torch_peaks(dev)


def check_graph_vs_eager(dev, student):
    model = Transformer.from_pretrained(student, dtype=torch.float32, device=dev).eval()
    prompts = tiny_prompts(8)
    # stopping at the byte tokenizer's ends, rows finish at other steps (the graphs' batch shrinks)
    args = dict(n=4, temperature=1.0, max_new_tokens=48, stop_ids=ByteTokenizer().eos_ids, seed=3,
                logprobs=True)
    graph = TorchSampler(model=model, decode='graph').generate(prompts, **args)
    eager = TorchSampler(model=model, decode='eager').generate(prompts, **args)
    pairs = [(g, e) for gs, es in zip(graph, eager) for g, e in zip(gs, es)]
    differ = sum(g.tokens != e.tokens for g, e in pairs)
    if differ:
        raise CheckFailed(f"{differ} of {len(pairs)} samples differ between decode='graph' and "
                          "decode='eager'")
    tokens = sum(len(g.tokens) for g, _ in pairs)
    lp_gap = max(abs(a - b) for g, e in pairs for a, b in zip(g.logprobs, e.logprobs))
    detail = (f"{len(pairs)} samples, {tokens} tokens alike (fp32); max |d log p| {lp_gap:.1e}")
    return detail, torch_peaks(dev)


def launch(script, args, ranks, log_path):
    """Run distill.py or eval.py with `--key=value` args (one plain process, or `ranks` under
    torchrun), its output into log_path; returns the output. Offline (HF_HUB_OFFLINE=1), and vLLM
    at INFO, so that it logs its memory."""
    cmd = [sys.executable, script]
    if ranks > 1:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
               f'--nproc_per_node={ranks}', script]
    cmd += [f'--{k}={v}' for k, v in args.items()]
    env = dict(os.environ, HF_HUB_OFFLINE='1', VLLM_LOGGING_LEVEL='INFO')
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        with open(log_path, 'w') as f:
            f.write(e.stdout.decode(errors='replace') if e.stdout else '')
        raise CheckFailed(f"{script} did not end within {timeout} s (its output: {log_path})")
    with open(log_path, 'w') as f:
        f.write(p.stdout)
    if p.returncode != 0:
        lines = [line.strip() for line in p.stdout.splitlines() if line.strip()]
        # the first error line is the cause (torchrun's own error comes after the rank's)
        errors = [line for line in lines
                  if line.startswith('error:') or re.match(r'[\w.]*(Error|Exception):', line)]
        cause = (errors or lines[-1:] or ['no output'])[0]
        raise CheckFailed(f"{script} exited {p.returncode}: {one_line(cause)} "
                          f"(its whole output: {log_path})")
    return p.stdout


def vllm_memory_lines(output):
    """The messages of vLLM's memory lines in a run's output, each once, in order."""
    seen = []
    for line in output.splitlines():
        if VLLM_MEMORY.search(line):
            # '(EngineCore pid=7) INFO 05-01 12:00:00 [gpu_worker.py:760] Available KV cache ...'
            message = line.split('] ', 1)[-1].strip()
            if message not in seen:
                seen.append(message)
    return seen


def check_distill(dev, backend, student, teacher, ranks, out_dir, rollout_ranks=0):
    """rollout_ranks > 0: the last ranks only sample (their engines a world of their own, the
    weights sent to them over a process group from trainer rank 0), one step behind."""
    args = dict(student=student, teacher=teacher, out_dir=out_dir, prompts='tiny', method='oprd',
                backend=backend, device=dev.type, prompts_per_step=4, n_samples=2,
                max_new_tokens=16, max_prompt_len=256, micro_batch_size=4, max_steps=2, lr=1e-3,
                warmup_frac=0.0, save_every=100, rollout_ranks=rollout_ranks)
    output = launch('distill.py', args, ranks, out_dir + '.log')
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    if [r['step'] for r in rows] != [0, 1]:
        raise CheckFailed(f"log.jsonl holds steps {[r['step'] for r in rows]}, not [0, 1]")
    if not all(math.isfinite(r['loss']) and math.isfinite(r['grad_norm']) for r in rows):
        raise CheckFailed(f"a loss or gradient norm is not finite: {rows}")
    saved = checkpoints_in(out_dir)
    if not saved:
        raise CheckFailed(f"no checkpoint in {out_dir}")
    detail = f"2 steps, loss {rows[0]['loss']:.4f} -> {rows[1]['loss']:.4f}"
    if 'sampler_logp_gap' in rows[-1]:
        detail += f", sampler dlogp {rows[-1]['sampler_logp_gap']:.1e}"
    if rollout_ranks:
        if not all('sampler/sample_s' in r for r in rows):
            raise CheckFailed("the log has no sampler/sample_s: the rollouts did not come from "
                              "the sampler ranks")
        detail += (f", the sampler ranks drew for {rows[-1]['sampler/sample_s']:.2f} s and "
                   f"waited {rows[-1]['sampler/wait_s']:.2f} s at step 1")
    detail += f", saved {os.path.basename(saved[-1])}"
    memory = vllm_memory_lines(output)
    if dev.type == 'cuda':
        peak = max(r['update_transient_mem_mb'] for r in rows)
        line = f"distill.py: update transient peak {peak:.0f} MB"
        wake = [r['reserved_mb_at_wake'] for r in rows if 'reserved_mb_at_wake' in r]
        if wake:
            line += f", reserved at the sampler's wake-up {max(wake):.0f} MB"
        memory.append(line)
    return detail, memory


def check_eval(dev, backend, ckpt, ranks, out_dir):
    args = dict(ckpt=ckpt, benchmarks='tiny', limit=8, n_samples=2, max_new_tokens=16,
                backend=backend, device=dev.type, out=out_dir)
    output = launch('eval.py', args, ranks, out_dir + '.log')
    with open(os.path.join(out_dir, 'summary.json')) as f:
        summary = json.load(f)['tiny']
    if summary['n_problems'] != 8 or summary['n_samples'] != 2:
        raise CheckFailed(f"summary.json has {summary['n_problems']} problems x "
                          f"{summary['n_samples']} samples, not 8 x 2")
    detail = (f"8 problems x 2 samples of {os.path.basename(ckpt)}: avg@2 {summary['avg@2']:.3f}, "
              f"mean length {summary['mean_len']:.1f} tokens")
    return detail, vllm_memory_lines(output)


# ----------------------------------------------------------------------------- main

def run_check(name, check, dev, *args):
    """check(dev, *args): its ok line and memory lines, or its FAILED line and exit status 1."""
    if dev.type == 'cuda':
        # the last check's models, caches and graphs go back to the device, for the next to measure
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    try:
        detail, memory = check(dev, *args)
    except Exception as e:
        reason = e if isinstance(e, CheckFailed) else f"{type(e).__name__}: {e}"
        print(f"FAILED {name}: {one_line(reason, 1000)}", flush=True)
        sys.exit(1)
    print(f"ok   {name}  {detail} ({time.perf_counter() - t0:.1f} s)", flush=True)
    for line in memory:
        print(f"mem  {name}  {line}", flush=True)


def backend_problem(backend, dev):
    """Why a backend cannot be checked on dev, or None."""
    if backend == 'torch':
        return None
    try:
        from vllm.platforms import current_platform
    except Exception as e:
        return f"vLLM does not import: {one_line(e, 200)}"
    runs_on = current_platform.device_type
    if runs_on != dev.type:
        return f"this vLLM build runs on {runs_on or 'no device'}, not {dev.type}"
    return None


def main(argv=None):
    configure(globals(), __file__, argv)
    names = [b.strip() for b in backends.split(',') if b.strip()]
    problems = [f"unknown backend {b!r}: expected torch or vllm" for b in names
                if b not in ('torch', 'vllm')]
    if not names:
        problems.append("backends is empty: name torch, vllm or both")
    if device not in ('auto', 'cuda', 'cpu'):
        problems.append(f"device={device!r}: expected auto, cuda or cpu")
    if device == 'cuda' and not torch.cuda.is_available():
        problems.append("device=cuda, but torch sees no GPU")
    if not logp_tol > 0 or not timeout > 0:
        problems.append(f"logp_tol={logp_tol}, timeout={timeout}: both must be > 0")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        sys.exit(2)
    on_gpu = device == 'cuda' or (device == 'auto' and torch.cuda.is_available())
    dev = torch.device('cuda', 0) if on_gpu else torch.device('cpu')
    gpus = torch.cuda.device_count() if on_gpu else 0
    if on_gpu:
        torch.cuda.init()
        where = f"{gpus} x {torch.cuda.get_device_name(dev)}"
    else:
        where = f"CPU, {os.cpu_count()} cores"
    root = os.path.abspath(work_dir or tempfile.mkdtemp(prefix='gpu_check_'))
    os.makedirs(root, exist_ok=True)
    print(f"gpu_check on {where}, torch {torch.__version__}; work_dir {root}", flush=True)
    t0 = time.perf_counter()
    student = os.path.join(root, 'student')
    teacher = os.path.join(root, 'teacher')
    run_check("tiny_model", check_tiny_model, dev, student, teacher)
    skipped = []
    for backend in names:
        problem = backend_problem(backend, dev)
        if problem:
            print(f"skip {backend}  ({problem})", flush=True)
            skipped.append(backend)
            continue
        run_check(f"weight_sync/{backend}", check_weight_sync, dev, backend, student, teacher)
        if backend == 'torch' and on_gpu:
            run_check("graph_vs_eager/torch", check_graph_vs_eager, dev, student)
        elif backend == 'torch':
            print("skip graph_vs_eager/torch  (CUDA graphs need a GPU)", flush=True)
            skipped.append("graph_vs_eager/torch")
        for ranks in (1, 2):
            if ranks == 2 and gpus < 2:
                why = f"{gpus} GPU visible" if on_gpu else "on a CPU"
                print(f"skip distill/{backend}/2ranks, eval/{backend}/2ranks, "
                      f"distill/{backend}/1+1ranks  (two ranks need two GPUs: {why})",
                      flush=True)
                skipped.append(f"{backend}/2ranks")
                continue
            run = os.path.join(root, f"{backend}_{ranks}rank")
            run_check(f"distill/{backend}/{ranks}rank", check_distill, dev, backend, student,
                      teacher, ranks, run)
            run_check(f"eval/{backend}/{ranks}rank", check_eval, dev, backend,
                      checkpoints_in(run)[-1], ranks, run + '_eval')
            if ranks == 2:
                # config/qwen_async.py's set-up: 1 trainer rank + 1 sampler rank
                run_check(f"distill/{backend}/1+1ranks", check_distill, dev, backend, student,
                          teacher, 2, os.path.join(root, f"{backend}_1+1ranks"), 1)
    passed = f"all checks passed in {time.perf_counter() - t0:.0f} s"
    if skipped:
        passed += f" (skipped: {', '.join(skipped)})"
    print(passed, flush=True)
    if not work_dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    # the guard matters: vLLM's engine core starts by spawning, which imports this file again
    main()
