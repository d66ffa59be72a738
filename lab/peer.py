"""
lab/bench.py's peer section: distill.py's opd_full and oprd against TRL's DistillationTrainer
(on-policy, full-vocabulary reverse KL) on one tiny random Qwen3 pair, seconds per whole step from a
warm process, where each step goes, what opd_full's step cannot go below on this core, and two costs
that floor leaves out (the ATen calls of a decode step, FSDP2 at one rank). TRL is no dependency of
this project; without it the section says how to install it.

$ python -m lab.bench --sections=peer --threads=1
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import data
from fsdp import StepClock
from losses import make_plan
from model import ModelConfig, Transformer, to_hf_config
from tokenizer import load_tokenizer
from lab.measure import CPU, best_time, forward_flops, random_model, update_flops

# the repository: distill.py is there
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRL_VERSION = "1.16.0"  # the release this section was written against
# datasets 5.2, which pip picks for it, fails to fingerprint a Dataset.from_list here (pickling
# pyarrow's MonthDayNano)
TRL_INSTALL = f'pip install trl=={TRL_VERSION} "datasets<5"'
PEER_VOCABS = (512, 151936)
PEER_PROMPTS = 8
PEER_NEW_TOKENS = 64
PEER_METHODS = ("opd_full", "oprd")
PEER_LAYERS = (2, 4)  # student, teacher
# one width, random weights; peer_tokenizer's <|im_end|> (1) ends a response, <pad> (0) pads
PEER_SHAPE = dict(model_type="qwen3", hidden_size=128, intermediate_size=384, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=512)

def peer_tokenizer(path):
    """The pair's tokenizer files, read by both trainers: transformers' byte-level ByT5 tokenizer
    (byte b is token b + 3; 0 <pad>, 1 <|im_end|>, 2 <unk>, 259 <|im_start|>) with ChatML chat."""
    from transformers import AddedToken, ByT5Tokenizer
    # keeps the whitespace around it
    eos = AddedToken("<|im_end|>", special=True)
    tok = ByT5Tokenizer(extra_ids=0, eos_token=eos, additional_special_tokens=["<|im_start|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(path)

def distill_steps(method, student, teacher, out_dir, steps):
    """distill.py as a user runs it (its own process, the torch sampler, fp32 on the CPU, this
    process's threads): the seconds of steps 2.. (log.jsonl's time/step: rollouts to optimizer step,
    weight sync, log), their mean length and the median seconds of each part of a step
    (time/rollout, time/teacher, ...)."""
    args = [f"--student={student}", f"--teacher={teacher}", f"--method={method}",
            f"--out_dir={out_dir}", "--backend=torch", "--device=cpu", "--prompts=tiny_train",
            "--max_prompt_len=64", "--n_samples=1", f"--prompts_per_step={PEER_PROMPTS}",
            f"--micro_batch_size={PEER_PROMPTS}", "--lr=1e-5",
            f"--max_new_tokens={PEER_NEW_TOKENS}", "--max_steps=1000",
            f"--stop_step={steps}"]  # no checkpoint
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "distill.py")] + args, env=env,
                       capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"distill.py --method={method} failed:\n{p.stderr[-3000:]}")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f][1:]  # the first step is the warm-up
    # where a step's time goes
    parts = {k: statistics.median(r[f"time/{k}"] for r in log) for k in StepClock.PARTS}
    seconds = [r["time/step"] for r in log]
    mean_len = statistics.mean(r["mean_response_len"] for r in log)
    return seconds, mean_len, parts

def trl_steps(student, teacher, out_dir, steps):
    """TRL's DistillationTrainer on the same task's prompts through the same chat template, one
    sample each, beta = 1 (reverse KL), fp32 on the CPU, no gradient checkpointing (as distill.py's
    default): the seconds of steps 2.. (from one step's end, after its optimizer step and log, to
    the next's), their mean response length and the median split of a step into TRL's generation
    (its generate call) and the rest (teacher, student, optimizer, log)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer
    ends, gen = [], [0.0]  # step ends; seconds in generation since the last step's end
    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append((time.perf_counter(), gen[0]))
            gen[0] = 0.0
    problems = data.load_problems("tiny_train")[:PEER_PROMPTS * steps]
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": data.build_prompt(p)}]}
                                 for p in problems])
    args = DistillationConfig(output_dir=out_dir, max_steps=steps,
                              per_device_train_batch_size=PEER_PROMPTS, beta=1.0,
                              max_completion_length=PEER_NEW_TOKENS, temperature=1.0,
                              learning_rate=1e-5, bf16=False, gradient_checkpointing=False,
                              use_cpu=True, logging_steps=1, report_to="none", save_strategy="no",
                              disable_tqdm=True)
    tokenizer = AutoTokenizer.from_pretrained(student, padding_side="left")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=prompts, processing_class=tokenizer,
                                  callbacks=[StepEnds()])
    trainer.remove_callback(PrinterCallback)  # a dict of figures per step
    # where TRL's on-policy step calls transformers' generate()
    generate = trainer._generate_single_turn
    def timed_generate(*a, **kw):
        t = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            gen[0] += time.perf_counter() - t
    trainer._generate_single_turn = timed_generate
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h]
    seconds = [b - a for (a, _), (b, _) in zip(ends, ends[1:])]
    rollout = [g for _, g in ends[1:]]
    parts = {"rollout": statistics.median(rollout),
             "rest": statistics.median(s - g for s, g in zip(seconds, rollout))}
    return seconds, statistics.mean(lengths[1:]), parts

def peer_prompts(student):
    """The token ids of one step's prompts (the task's first 8, through the chat template), as
    distill.py reads them."""
    tok = load_tokenizer(student)
    return [data.encode_prompt(p, tok, False)
            for p in data.load_problems("tiny_train")[:PEER_PROMPTS]]

def floors(vocab, student, response_len):
    """What distill.py's opd_full step cannot go below on this core: its FLOPs (lab/bench.py's
    count) over the rate of fp32 products of as many rows, measured here (norms, softmax, the
    optimizer and per-operation overhead not counted). The update's products have 8 x T rows (T: the
    task's first 8 prompts' mean length + the run's mean response length); each of the rollout's
    sequential decode steps has 8."""
    c_s, c_t = (ModelConfig(**dict(PEER_SHAPE, vocab_size=vocab, num_hidden_layers=n))
                for n in PEER_LAYERS)
    prompt = statistics.mean(len(p) for p in peer_prompts(student))
    T = round(prompt + response_len)
    d = PEER_SHAPE["hidden_size"]
    hidden = PEER_SHAPE["intermediate_size"]
    plan = make_plan("opd_full", c_s, c_t, "all", "last_k", 2000, "predict", "mse", 1.0, 1.0,
                     16, 1024)
    head_rows = round(PEER_PROMPTS * response_len)
    update = update_flops(plan, c_s, c_t, PEER_PROMPTS, T, head_rows, False)[0]
    decode = (round(response_len)
              * forward_flops(c_s, PEER_PROMPTS, 1, c_s.num_hidden_layers, PEER_PROMPTS))
    rate = {}
    for rows in (PEER_PROMPTS * T, PEER_PROMPTS):  # (rows x d) @ (d x the MLP's width)
        a, b = torch.randn(rows, d), torch.randn(d, hidden)
        rate[rows] = 2 * rows * d * hidden / best_time(lambda: a @ b, 200, CPU)
    return dict(length=T, update_gflop=update / 1e9, update_seconds=update / rate[PEER_PROMPTS * T],
                decode_gflop=decode / 1e9, decode_seconds=decode / rate[PEER_PROMPTS],
                gflop_s={rows: r / 1e9 for rows, r in rate.items()})

def aten_calls(fn):
    """How many ATen operations fn() dispatches (views and in-place ones too, composites as what
    they call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))
    with Count() as c:
        fn()
    return c.n

def eager_costs(student, length, repeats=10):
    """Two costs in distill.py's step that the FLOP floor leaves out, measured in this process on
    the pair's student:
    - dispatch in the rollout: the ATen operations the torch sampler calls per decode step (8 rows,
      no stop token: the calls of a PEER_NEW_TOKENS-token generate less those of a 1-token one, over
      the steps between) and the seconds of a step (best of `repeats`, likewise);
    - FSDP2 at one rank, which shards nothing but hooks every block, gathers and reduces through
      gloo and sends the optimizer's step through DTensor: the seconds of the student's forward (to
      its last hidden state: no head), backward, AdamW step and weight stream
      (rollout.fsdp_named_tensors, as distill.py's sync) on 8 x `length` random tokens, as a plain
      module and under fsdp.shard (best of `repeats` each), and both copies' weights after it, which
      must agree: the two do the same arithmetic."""
    import torch.distributed as dist
    from fsdp import setup_distributed, shard
    from rollout import fsdp_named_tensors
    from sampler import TorchSampler
    sampler = TorchSampler(model=Transformer.from_pretrained(student))
    prompts = peer_prompts(student)
    steps = []
    for k in (1, PEER_NEW_TOKENS):
        run = lambda: sampler.generate(prompts, max_new_tokens=k, stop_ids=[])
        steps.append((aten_calls(run), best_time(run, repeats, CPU)))
    n = PEER_NEW_TOKENS - 1
    res = dict(decode_ops=(steps[1][0] - steps[0][0]) / n,
               decode_seconds=(steps[1][1] - steps[0][1]) / n)
    setup_distributed("cpu", 10)
    try:
        idx = torch.randint(3, sampler.model.config.vocab_size, (PEER_PROMPTS, length),
                            generator=torch.Generator().manual_seed(0))
        for name in ("plain", "fsdp2"):
            model = Transformer.from_pretrained(student)
            L = model.config.num_hidden_layers
            if name == "fsdp2":
                model = shard(model, CPU, torch.float32, dist.group.WORLD)
            # as distill.py's on a CPU
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
            def step():
                model(idx, taps=[L])[L].pow(2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                for _ in fsdp_named_tensors(model):
                    pass
            res[f"{name}_seconds"] = best_time(step, repeats, CPU)
            res[f"{name}_weights"] = dict(fsdp_named_tensors(model))
    finally:
        torch.distributed.destroy_process_group()
    return res

def bench_peer(cfg, device):
    try:
        # DistillationTrainer is imported only to check that this TRL release has it (older
        # releases have no trainer); trl_steps imports it where it is used
        from trl import DistillationTrainer, __version__ as trl_version
    except ImportError:
        line = f"peer: skipped, TRL is not installed (no dependency of this project): {TRL_INSTALL}"
        print(line, flush=True)
        return dict(skipped=line)
    del DistillationTrainer
    steps = cfg["peer_steps"]
    root = tempfile.mkdtemp(prefix="bench_peer_")
    res = dict(trl=trl_version, torch_threads=torch.get_num_threads(), steps=steps)
    try:
        for vocab in PEER_VOCABS:
            student, teacher = (os.path.join(root, f"{who}_{vocab}")
                                for who in ("student", "teacher"))
            for seed, (layers, path) in enumerate(zip(PEER_LAYERS, (student, teacher))):
                shape = dict(PEER_SHAPE, vocab_size=vocab, num_hidden_layers=layers)
                model = random_model(shape, CPU, seed=seed)
                model.hf_config = dict(to_hf_config(model.config), eos_token_id=1, pad_token_id=0)
                model.save_pretrained(path)
                peer_tokenizer(path)
            runs = {m: distill_steps(m, student, teacher, f"{root}/{m}_{vocab}", steps)
                    for m in PEER_METHODS}
            runs["trl"] = trl_steps(student, teacher, f"{root}/trl_{vocab}", steps)
            r = res[f"vocab_{vocab}"] = {
                who: dict(seconds_per_step=statistics.median(s), step_seconds=s, response_len=n,
                          median_parts=p)
                for who, (s, n, p) in runs.items()}
            for m in PEER_METHODS:
                r[m]["over_trl"] = r[m]["seconds_per_step"] / r["trl"]["seconds_per_step"]
            ours = ", ".join(f"{m} {r[m]['seconds_per_step']:.2f} ({r[m]['over_trl']:.2f}x TRL's)"
                             for m in PEER_METHODS)
            lengths = ", ".join(f"{w} {r[w]['response_len']:.1f}" for w in r)
            print(f"peer, V={vocab:,}: seconds per step (median of steps 2..{steps}): "
                  f"TRL DistillationTrainer {r['trl']['seconds_per_step']:.2f}, distill.py "
                  + ours + " | mean response length " + lengths, flush=True)
            for m in ("trl", *PEER_METHODS):
                print(f"  {m}, median seconds of each part: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in r[m]["median_parts"].items()), flush=True)
            f = r["floor"] = floors(vocab, student, r["opd_full"]["response_len"])
            rates = ", ".join(f"{g:.0f} GFLOP/s on {n} rows" for n, g in f["gflop_s"].items())
            print(f"  floor of opd_full's step at this core's matmul rate ({rates}): update "
                  f"{f['update_gflop']:.2f} GFLOP >= {f['update_seconds']:.3f} s, the rollout's "
                  f"decode steps {f['decode_gflop']:.2f} GFLOP >= {f['decode_seconds']:.3f} s; "
                  f"half TRL's step: {r['trl']['seconds_per_step'] / 2:.3f} s", flush=True)
            e = eager_costs(student, f["length"])
            r["eager"] = {k: v for k, v in e.items() if not k.endswith("_weights")}
            step_ms = e["decode_seconds"] * 1e3
            fsdp_ms = (e["fsdp2_seconds"] - e["plain_seconds"]) * 1e3
            # one decode step's
            floor_ms = f["decode_seconds"] / round(r["opd_full"]["response_len"]) * 1e3
            print(f"  a decode step of the rollout: {e['decode_ops']:.0f} ATen calls in "
                  f"{step_ms:.2f} ms (its FLOPs need {floor_ms:.2f} ms); FSDP2 at one rank "
                  f"(nothing to shard) adds {fsdp_ms:.1f} ms to the student's forward, backward, "
                  f"AdamW step and weight stream ({e['plain_seconds'] * 1e3:.1f} ms plain, "
                  f"{e['fsdp2_seconds'] * 1e3:.1f} ms sharded)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return res
