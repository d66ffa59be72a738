"""
On-policy distillation: OPRD (hidden states), the output-space OPD baselines, and SFT, in one explicit loop.

One node of 8 GPUs (the paper's main setting, ../shared/METHOD.md §5):
$ torchrun --standalone --nproc_per_node=8 distill.py config/qwen.py
A baseline on the same setting:
$ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_opd_topk.py
One process (CPU or one GPU), overrides on the command line:
$ python distill.py config/tiny.py --method=opd --max_steps=20
OPRD-Bridge (METHOD.md §4, a teacher of another width): stage 1 fits the frozen bridge, stage 2 distills through it:
$ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_bridge.py --method=bridge_fit
$ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_bridge.py

Per step (run() at the bottom reads as the paper's algorithm box): this rank's share of the step's prompts ->
rollouts of the current student (rollout.py) -> teacher forward (no grad) -> student forward + backward ->
optimizer step -> new weights pushed to the sampler -> log -> checkpoint. Under `oprd` alone neither model
computes logits and the teacher runs only up to its deepest tapped layer. Every process, one or many, trains in
a process group with the student under FSDP2, so one GPU trains exactly as a one-rank torchrun does.
"""
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

import data
from bridge import arch, check_bridge, fit_stage1, init_projector, load_bridge
from fsdp import (MemoryMeter, all_reduce_max, all_reduce_sum, clip_grad_norm, is_dist, load_training_state,
                  read_resume, save_checkpoint, setup_distributed, shard, shard_projector)
from losses import DistillError, depth_map, oprd_loss, output_loss, parse_layers, response_masks, sft_loss
from model import CheckpointError, Transformer, checkpoints_in, resolve_checkpoint
from tokenizer import load_tokenizer, same_tokenization

# -----------------------------------------------------------------------------
# default config values, overridden by config/*.py and --key=value
out_dir = 'out'
init_from = 'scratch'         # 'scratch' (student from `student`) | 'resume' (newest checkpoint in out_dir)
student = ''                  # HF checkpoint folder of the student
teacher = ''                  # HF checkpoint folder of the frozen teacher
method = 'oprd'               # oprd | opd | opd_topk | opd_full | opd+oprd | opd_topk+oprd | sft
                              # | bridge_fit (OPRD-Bridge stage 1) | oprd_bridge (stage 2)
# data
prompts = 'dapo17k'           # benchmark name, builtin task name, or a .jsonl file (data.load_problems)
data_dir = ''                 # folder of <name>.jsonl when offline
max_prompt_len = 2048         # prompts longer than this (in tokens) are dropped
enable_thinking = False       # chat template flag (the paper trains with thinking disabled)
# rollouts
backend = 'auto'              # auto | vllm | torch
prompts_per_step = 8          # over all ranks
n_samples = 2                 # rollouts per prompt
temperature = 1.0
top_p = 1.0
top_k = -1
max_new_tokens = 16384
gpu_memory_utilization = 0.3  # vLLM's share of the accelerator
tensor_parallel_size = 1      # vLLM tensor parallelism: a group's ranks share prompts, then split the rollouts
# OPRD (METHOD.md §2)
layers = 'all'                # last | all | even | odd | '4,8,12' (student layers, output_hidden_states indices)
positions = 'last_k'          # all | first_k | last_k
k_positions = 2000
distance = 'mse'              # mse (raw MSE / d) | normalized_mse (MSE of L2-normalised states)
align = 'predict'             # 'predict': the state that predicts token t (position t-1); 'token': the state at t
oprd_coef = 1.0
mu = 1.0                      # weight of OPRD in the combined objectives opd+oprd, opd_topk+oprd
projector = False             # learn a linear map d_S -> d_T per layer when the widths differ
projector_init = 'random'     # its start: nn.Linear's init (the paper) | lstsq (least squares on step 0's rollouts)
# OPRD-Bridge (METHOD.md §4): a frozen rank-r bridge per layer, fit by method=bridge_fit, used by oprd_bridge
bridge_path = ''              # folder: bridge.safetensors + bridge.json
bridge_rank = 8               # r: the teacher's top-r principal directions (8 cross-architecture, 4 cross-tokenizer)
bridge_rows = 16384           # at most this many rows per layer (gathered over ranks) for the PCA and P_S
bridge_lr = 1e-4              # P_S: AdamW, weight decay 0, 10% of the rows held out, best held-out cosine kept
bridge_epochs = 20
bridge_batch_size = 256
bridge_init = 'random'        # P_S starts from nn.Linear's init (the paper) or 'lstsq' (the closed-form solution)
# output-space OPD (METHOD.md §3)
topk = 16
vocab_chunk_tokens = 1024     # output losses run over this many positions at a time: no [B, T, V] tensor
# optimization
max_steps = 500
micro_batch_size = 4          # sequences per forward/backward; the step accumulates over the rank's rollouts
lr = 1e-5
min_lr = 0.0
warmup_frac = 0.03
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
activation_checkpointing = False
device = 'auto'               # auto (cuda if there is one) | cpu | cuda
dist_timeout_min = 120        # collectives wait this long (rank 0 writing a many-GB checkpoint while others wait)
teacher_fsdp = False          # shard the teacher with FSDP2 too (when it does not fit replicated)
max_bad_steps = 3             # consecutive NaN/inf steps before the run stops
stop_step = 0                 # >0: stop after this many steps as if preempted (the schedule still spans max_steps)
# io
seed = 0
log_every = 1
save_every = 100              # also saved at the last step
keep_checkpoints = 2
wandb_log = False
wandb_project = 'oprd'
# -----------------------------------------------------------------------------

METHODS = ('oprd', 'opd', 'opd_topk', 'opd_full', 'opd+oprd', 'opd_topk+oprd', 'sft', 'bridge_fit', 'oprd_bridge')
_samplers = []  # started samplers, closed by main() before the process group goes (vLLM's teardown needs it)

# ----------------------------------------------------------------------------- one update

@dataclass
class Plan:
    """What an update computes, fixed once from the config and the two models."""
    method: str
    out_kind: str | None          # output-space loss: opd | opd_topk | opd_full | None
    s_layers: list                # student layers aligned by OPRD (empty without OPRD)
    t_layers: list                # phi(l) for each
    s_taps: list                  # what each forward computes: OPRD layers, plus the final norm for logits
    t_taps: list
    L_s: int
    L_t: int
    vocab: int                    # common vocabulary prefix
    positions: str = 'last_k'
    k_positions: int = 2000
    align: str = 'predict'
    distance: str = 'mse'
    oprd_weight: float = 1.0      # oprd_coef, times mu in the combined objectives
    topk: int = 16
    chunk: int = 1024


def make_plan(method, stu_cfg, tea_cfg, layers='all', positions='last_k', k_positions=2000, align='predict',
              distance='mse', oprd_coef=1.0, mu=1.0, topk=16, chunk=1024):
    if method not in METHODS:
        raise DistillError(f"method={method!r} does not exist: choose one of {', '.join(METHODS)}")
    out_kind = {'opd': 'opd', 'opd_topk': 'opd_topk', 'opd_full': 'opd_full', 'opd+oprd': 'opd',
                'opd_topk+oprd': 'opd_topk'}.get(method)
    L_s = stu_cfg.num_hidden_layers
    L_t = tea_cfg.num_hidden_layers if tea_cfg is not None else 0
    s_layers = parse_layers(layers, L_s) if 'oprd' in method or method == 'bridge_fit' else []
    t_layers = [depth_map(l, L_s, L_t) for l in s_layers]
    s_taps = sorted(set(s_layers) | ({L_s} if out_kind or method == 'sft' else set()))
    t_taps = sorted(set(t_layers) | ({L_t} if out_kind else set()))
    vocab = min(stu_cfg.vocab_size, tea_cfg.vocab_size) if tea_cfg is not None else stu_cfg.vocab_size
    return Plan(method, out_kind, s_layers, t_layers, s_taps, t_taps, L_s, L_t, vocab, positions, k_positions,
                align, distance, oprd_coef * (mu if out_kind else 1.0), topk, chunk)


def micro_batch_loss(stu, tea, b, plan, proj, n_out, n_rep, bridge=None):
    """Teacher forward (no grad), student forward, and the loss of one micro-batch, already divided by the
    global supervised-token counts n_out (output-space positions) and n_rep (OPRD positions).
    proj: the learned projector (or None); bridge: the frozen OPRD-Bridge (or None).

    Under OPRD alone neither model computes logits, and each runs only up to its deepest tapped layer.
    """
    with torch.no_grad():
        hs_t = tea(b['idx'], attention_mask=b['attn'], taps=plan.t_taps) if tea is not None else None
    hs_s = stu(b['idx'], attention_mask=b['attn'], taps=plan.s_taps)
    loss = hs_s[plan.s_taps[-1]].new_zeros((), dtype=torch.float32)
    stats = {'kl': 0.0, 'layer_loss': [], 'layer_cos': []}
    if plan.out_kind or plan.method == 'sft':
        m = b['out_mask']  # positions whose next token is a response token
        rows_s = hs_s[plan.L_s][m]
        targets = b['idx'][:, 1:][m[:, :-1]]
        if plan.method == 'sft':
            out = sft_loss(stu.lm_head(rows_s)[:, :plan.vocab], targets)
        else:
            out, stats['kl'] = output_loss(plan.out_kind, rows_s, hs_t[plan.L_t][m], targets, stu.lm_head.weight,
                                           tea.lm_head.weight, plan.vocab, plan.topk, plan.chunk)
        loss = loss + out / max(n_out, 1)
    if plan.s_layers:
        m = response_masks(b['resp'], plan.positions, plan.k_positions, plan.align)
        rep = 0.0
        for ls, lt in zip(plan.s_layers, plan.t_layers):
            k = str(ls)  # through the frozen bridge (both sides mapped), the learned projector, or as they are
            maps = (bridge.student[k], bridge.teacher[k]) if bridge is not None else (proj and proj[k], None)
            l_sum, cos = oprd_loss(hs_s[ls][m], hs_t[lt][m], plan.distance, *maps)
            rep = rep + l_sum / len(plan.s_layers)
            stats['layer_loss'].append(l_sum.item())
            stats['layer_cos'].append(cos.item())
        loss = loss + plan.oprd_weight * rep / max(n_rep, 1)
    return loss, stats


def lr_at(step):
    """Linear warm-up over warmup_frac of the run, then cosine decay to min_lr."""
    warmup = max(1, math.ceil(warmup_frac * max_steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


# ----------------------------------------------------------------------------- set-up, before any work

# (setting, valid?, what it must be): every range a typed value can break, checked before anything loads
RULES = [
    ('method', lambda v: v in METHODS, f" does not exist: choose one of {', '.join(METHODS)}"),
    ('init_from', lambda v: v in ('scratch', 'resume'), ": must be scratch or resume"),
    ('backend', lambda v: v in ('auto', 'vllm', 'torch'), ": must be auto, vllm or torch"),
    ('device', lambda v: v in ('auto', 'cpu', 'cuda'), ": must be auto, cpu or cuda"),
    ('positions', lambda v: v in ('all', 'first_k', 'last_k'), ": must be all, first_k or last_k"),
    ('distance', lambda v: v in ('mse', 'normalized_mse'), ": must be mse or normalized_mse"),
    ('align', lambda v: v in ('predict', 'token'), ": must be predict or token"),
    ('temperature', lambda v: v >= 0, ": must be >= 0"),
    ('top_p', lambda v: 0 < v <= 1, ": must be in (0, 1]"),
    ('top_k', lambda v: v == -1 or v >= 1, ": must be -1 (off) or >= 1"),
    ('gpu_memory_utilization', lambda v: 0 < v <= 1, ": must be in (0, 1]"),
    ('lr', lambda v: v > 0, ": must be > 0"),
    ('min_lr', lambda v: 0 <= v <= lr, ": must be in [0, lr]"),
    ('stop_step', lambda v: v >= 0, ": must be >= 0 (0 = off)"),
] + [(k, lambda v: 0 <= v < 1, ": must be in [0, 1)") for k in ('warmup_frac', 'beta1', 'beta2')] + [
    (k, lambda v: v in ('random', 'lstsq'), ": must be random or lstsq") for k in ('bridge_init', 'projector_init')
] + [(k, lambda v: v >= 0, ": must be >= 0") for k in ('weight_decay', 'grad_clip', 'mu', 'oprd_coef')] + [
    (k, lambda v: v >= 1, ": must be >= 1") for k in (
        'prompts_per_step', 'n_samples', 'max_new_tokens', 'max_prompt_len', 'k_positions', 'topk',
        'vocab_chunk_tokens', 'max_steps', 'micro_batch_size', 'max_bad_steps', 'log_every', 'save_every',
        'keep_checkpoints', 'tensor_parallel_size', 'bridge_rank', 'bridge_rows', 'bridge_epochs',
        'bridge_batch_size', 'dist_timeout_min')] + [('bridge_lr', lambda v: v > 0, ": must be > 0")]


def check_settings():
    """One DistillError for the first setting or input that cannot work, before any model loads or any folder
    is made. Checks that need the models (layers in range, widths, tokenizers) come right after loading."""
    for key, ok, want in RULES:
        if not ok(globals()[key]):
            raise DistillError(f"{key}={globals()[key]!r}{want}")
    if device == 'cuda' and not torch.cuda.is_available():
        raise DistillError("device='cuda' but torch sees no GPU: use device=cpu (or auto)")
    world = int(os.environ.get('WORLD_SIZE', 1))
    if world % tensor_parallel_size:
        raise DistillError(f"tensor_parallel_size={tensor_parallel_size} does not divide the {world} ranks")
    if init_from == 'scratch' and not student:
        raise DistillError("no student checkpoint: set student=<HF folder or hub id>")
    if method != 'sft' and not teacher:
        raise DistillError(f"method={method} needs a teacher: set teacher=<HF folder or hub id>")
    if method in ('bridge_fit', 'oprd_bridge') and (projector or not bridge_path):
        raise DistillError(f"method={method} with projector=True: the bridge replaces the projector" if projector
                           else f"method={method} needs bridge_path=<folder of the bridge>")
    used = (['step_*'] if checkpoints_in(out_dir) else []) + \
        (['log.jsonl'] if os.path.exists(os.path.join(out_dir, 'log.jsonl')) else [])
    if init_from == 'scratch' and used and method != 'bridge_fit':  # stage 1 writes bridge_path, not out_dir
        raise DistillError(f"out_dir {out_dir!r} holds another run ({' and '.join(used)}): continue it with "
                           "--init_from=resume, or choose another --out_dir")
    if init_from == 'resume' and not checkpoints_in(out_dir):
        raise DistillError(f"init_from='resume' but {out_dir!r} has no step_* checkpoint")


def check_resume(saved, cfg, world, stu_cfg, tea_cfg):
    """A resumed run must be the same experiment: refuse another method, layer or position set, teacher or
    world size; print any other setting that changed."""
    now = dict(cfg, world=world, student_arch=arch(stu_cfg), teacher_arch=arch(tea_cfg) if tea_cfg else None)
    then = dict(saved['config'], world=saved.get('world'), student_arch=saved.get('student_arch'),
                teacher_arch=saved.get('teacher_arch'))
    for k in ('method', 'layers', 'positions', 'world', 'student_arch', 'teacher_arch'):
        if then.get(k) != now[k]:
            raise DistillError(f"cannot resume {out_dir!r} with {k}={now[k]!r}: the run was started with "
                               f"{then.get(k)!r} (continue it as it was, or start another out_dir)")
    changed = [f"{k} {then[k]!r} -> {now[k]!r}" for k in now if k in then and then[k] != now[k] and k != 'init_from']
    if changed and dist.get_rank() == 0:
        print(f"resuming with changed settings: {', '.join(changed)}")


def load_models(student_path, dev, master):
    """Student (fp32 master weights), frozen teacher (compute dtype), tokenizer, the plan, and the projector
    or bridge, with every check that needs them. Returns a dict of them."""
    compute_dtype = torch.bfloat16 if dev.type == 'cuda' else torch.float32
    try:
        student_path = resolve_checkpoint(student_path)  # a hub id is downloaded once, then used as a folder
        stu = Transformer.from_pretrained(student_path, dtype=torch.float32, device=dev)
        tea, teacher_path = None, teacher
        if method != 'sft':
            teacher_path = resolve_checkpoint(teacher)
            tea = Transformer.from_pretrained(teacher_path, dtype=compute_dtype, device=dev).eval()
            tea.requires_grad_(False)
    except CheckpointError as e:
        raise DistillError(str(e)) from None
    tok = load_tokenizer(student_path)
    if tea is not None and not same_tokenization(tok, load_tokenizer(teacher_path)):
        raise DistillError(f"teacher {teacher!r} and student {student_path!r} tokenize differently: "
                           "OPRD and OPD need identical rollout token ids")
    plan = make_plan(method, stu.config, tea.config if tea is not None else None, layers, positions, k_positions,
                     align, distance, oprd_coef, mu, topk, vocab_chunk_tokens)
    m = dict(stu=stu, tea=tea, tok=tok, plan=plan, proj=None, bridge=None, bridge_meta=None,
             student_path=student_path, teacher_path=teacher_path, compute_dtype=compute_dtype)
    if tea is None:
        return m
    d_s, d_t = stu.config.hidden_size, tea.config.hidden_size
    if method == 'bridge_fit' and bridge_rank > min(d_s, d_t):
        raise DistillError(f"bridge_rank={bridge_rank} is above the width: it must be 1..{min(d_s, d_t)} "
                           f"(student width {d_s}, teacher width {d_t})")
    if method == 'oprd_bridge':
        m['bridge'], m['bridge_meta'] = load_bridge(bridge_path)
        check_bridge(m['bridge_meta'], bridge_path, plan, stu.config, tea.config)
        m['bridge'] = m['bridge'].to(dev)
    elif plan.s_layers and d_s != d_t and method != 'bridge_fit':
        if not projector:
            raise DistillError(f"teacher width {d_t} != student width {d_s}: set projector=True, or fit a "
                               "bridge (method=bridge_fit) and use method=oprd_bridge")
        m['proj'] = nn.ModuleDict({str(l): nn.Linear(d_s, d_t, bias=False) for l in plan.s_layers}).to(dev)
    if plan.out_kind and stu.config.vocab_size != tea.config.vocab_size and master:
        print(f"vocabularies differ ({stu.config.vocab_size} vs {tea.config.vocab_size}): "
              f"comparing the common prefix of {plan.vocab}")
    return m


def load_prompts(tok):
    """The training prompts as token ids (the paper's prompt through the chat template), too-long ones dropped;
    under sft each with its reference solution as the response."""
    items = []
    for p in data.load_problems(prompts, data_dir or None):
        ids = data.encode_prompt(p, tok, enable_thinking)
        if len(ids) > max_prompt_len:
            continue
        item = {'id': p['id'], 'prompt': ids}
        if method == 'sft':
            if not p.get('solution'):
                raise DistillError(f"method=sft needs reference solutions; {prompts!r} has none for {p['id']!r}")
            item['response'] = tok.encode(p['solution']) + tok.eos_ids[:1]
        items.append(item)
    if not items:
        raise DistillError(f"no prompt of {prompts!r} fits max_prompt_len={max_prompt_len}")
    return items


def make_optimizer(stu, proj):
    """AdamW over the student (and projector), weight decay on matrices only; fused on a GPU."""
    params = list(stu.parameters()) + (list(proj.parameters()) if proj is not None else [])
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    on_gpu = next(stu.parameters()).device.type == 'cuda'
    return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), fused=on_gpu), params


# ----------------------------------------------------------------------------- the step's pieces

def step_prompts(items, step, rank, world):
    """This rank's prompts of a step: a seeded permutation per epoch, the step's slice, every world-th item.
    Shares may differ by one (or be empty): the micro-batch loop pads them."""
    per_epoch = max(1, len(items) // prompts_per_step)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [items[i] for i in order[pos * prompts_per_step:(pos + 1) * prompts_per_step]][rank::world]


def rollouts(sampler, items, step, rank, world, tok):
    """(prompt ids, response ids, finish) for this rank to train on. The ranks of one tensor-parallel group
    share prompts and seed (vLLM's external launcher serves them together), then each keeps every tp-th
    sequence, so each rollout is trained on once."""
    tp = tensor_parallel_size if method != 'sft' else 1  # sft has no sampler: every rank its own share
    mine = step_prompts(items, step, rank // tp, world // tp)
    if method == 'sft':
        return [(it['prompt'], it['response'], 'stop') for it in mine]
    samples = sampler.generate([it['prompt'] for it in mine], n=n_samples, temperature=temperature, top_p=top_p,
                               top_k=top_k, max_new_tokens=max_new_tokens, stop_ids=tok.eos_ids,
                               seed=seed * 1_000_003 + step * (world // tp) + rank // tp) if mine else []
    sampler.sleep()
    return [(it['prompt'], s.tokens, s.finish) for it, ss in zip(mine, samples) for s in ss][rank % tp::tp]


def collate(seqs, pad_id, device):
    """Right-padded (B, T) ids + masks. resp marks response tokens; out_mask the positions that predict them."""
    T = max(len(p) + len(r) for p, r, _ in seqs)
    B = len(seqs)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.bool)
    resp = torch.zeros(B, T, dtype=torch.bool)
    for i, (p, r, _) in enumerate(seqs):
        idx[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attn[i, :len(p) + len(r)] = True
        resp[i, len(p):len(p) + len(r)] = True
    out_mask = torch.cat([resp[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], dim=1)
    return {'idx': idx.to(device), 'attn': attn.to(device), 'resp': resp.to(device), 'out_mask': out_mask.to(device)}


def accumulate_gradients(stu, tea, seqs, plan, proj, bridge, filler, pad_id, dev):
    """Teacher forward, student forward and backward over this rank's micro-batches; gradients accumulate and
    are reduced across ranks after the last one. Every rank runs as many micro-batches as the busiest rank,
    the extra ones zero-weight copies of `filler`: FSDP2's collectives pair up only if the counts match.
    The loss is divided by the all-reduced count of supervised tokens, so sharding does not change it; FSDP
    averages gradients over ranks, hence the factor world."""
    batches = [collate(seqs[i:i + micro_batch_size], pad_id, dev) for i in range(0, len(seqs), micro_batch_size)]
    n_out = all_reduce_sum(sum(b['out_mask'].sum().item() for b in batches)).item()
    n_rep = all_reduce_sum(sum(response_masks(b['resp'], positions, k_positions, align).sum().item()
                               for b in batches)).item() if plan.s_layers else 0.0
    n_mb = int(all_reduce_max(len(batches)))
    st = {'loss': 0.0, 'kl': 0.0, 'tokens': 0, 'n_out': n_out, 'n_rep': n_rep,
          'layer_loss': [0.0] * len(plan.s_layers), 'layer_cos': [0.0] * len(plan.s_layers)}
    stu.train()
    for mi in range(n_mb):
        stu.set_requires_gradient_sync(mi == n_mb - 1)
        b, weight = (batches[mi], 1.0) if mi < len(batches) else (filler, 0.0)
        loss, ms = micro_batch_loss(stu, tea, b, plan, proj, n_out, n_rep, bridge)
        (loss * (dist.get_world_size() * weight)).backward()
        if weight:
            st['loss'] += loss.item()
            st['kl'] += ms['kl']
            st['tokens'] += b['attn'].sum().item()
            st['layer_loss'] = [a + x for a, x in zip(st['layer_loss'], ms['layer_loss'])]
            st['layer_cos'] = [a + x for a, x in zip(st['layer_cos'], ms['layer_cos'])]
    return st


def log_record(step, st, lr_now, grad_norm, loss, seqs, t_rollout, t_update, mem, plan, sampler):
    """The step's figures, reduced over ranks: what is printed and appended to log.jsonl."""
    n_seqs = all_reduce_sum(len(seqs)).item()
    gen = all_reduce_sum(sum(len(r) for _, r, _ in seqs)).item()
    rec = {'step': step, 'loss': loss, 'grad_norm': grad_norm, 'lr': lr_now,
           'sequences': n_seqs, 'mean_response_len': gen / max(n_seqs, 1),
           'trunc_rate': all_reduce_sum(sum(f == 'length' for _, _, f in seqs)).item() / max(n_seqs, 1),
           'update_tok_s': all_reduce_sum(st['tokens']).item() / max(all_reduce_max(t_update), 1e-9),
           'update_transient_mem_mb': mem / 2**20}
    if sampler is not None:
        rec['rollout_tok_s'] = gen / max(all_reduce_max(t_rollout), 1e-9)
    for j, l in enumerate(plan.s_layers):
        rec[f'oprd_loss/{l}'] = all_reduce_sum(st['layer_loss'][j]).item() / max(st['n_rep'], 1)
        rec[f'cos/{l}'] = all_reduce_sum(st['layer_cos'][j]).item() / max(st['n_rep'], 1)
    if plan.out_kind:
        rec['kl'] = all_reduce_sum(st['kl']).item() / max(st['n_out'], 1)
    return rec


def print_record(rec, plan):
    extra = f" | kl {rec['kl']:.4f}" if plan.out_kind else ''
    if plan.s_layers:
        extra += f" | cos {sum(rec[f'cos/{l}'] for l in plan.s_layers) / len(plan.s_layers):.4f}"
    if 'rollout_tok_s' in rec:
        extra += f" | rollout {rec['rollout_tok_s']:.0f} tok/s"
    print(f"step {rec['step']}: loss {rec['loss']:.6f} | grad {rec['grad_norm']:.3f} | lr {rec['lr']:.2e} | "
          f"len {rec['mean_response_len']:.1f} | trunc {rec['trunc_rate']:.2f}{extra} | "
          f"update {rec['update_tok_s']:.0f} tok/s | mem +{rec['update_transient_mem_mb']:.1f} MB", flush=True)


# ----------------------------------------------------------------------------- OPRD-Bridge stage 1

def bridge_batches(sampler, items, rank, world, tok, dev):
    """Stage 1's input, one rollout step at a time: the student's rollouts of the training prompts (the training
    steps' order and seeds, one pass at most) as micro-batches, each with the positions stage 2 supervises."""
    for step in range(max(1, len(items) // prompts_per_step)):
        seqs = rollouts(sampler, items, step, rank, world, tok)
        batches = [collate(seqs[i:i + micro_batch_size], tok.pad_id, dev)
                   for i in range(0, len(seqs), micro_batch_size)]
        yield [(b, response_masks(b['resp'], positions, k_positions, align)) for b in batches]


# ----------------------------------------------------------------------------- the run

def announce(m, world, n_prompts, resuming):
    plan, stu = m['plan'], m['stu']
    print(resuming) if resuming else None
    print(f"method {method} | student {m['student_path']} ({plan.L_s} layers, d={stu.config.hidden_size}) | "
          f"teacher {teacher or '-'} | world {world} | {n_prompts} prompts")
    if plan.s_layers:
        print(f"OPRD layers {plan.s_layers} -> teacher {plan.t_layers}; positions {positions}"
              f"{'' if positions == 'all' else f' (k={k_positions})'}; distance {distance}; align {align}")
    if m['bridge'] is not None:
        cos = m['bridge_meta']['heldout_cos']
        print(f"through the frozen bridge {bridge_path}: rank {m['bridge_meta']['rank']}, held-out cosine "
              f"{sum(cos.values()) / len(cos):.4f} (mean)")
    per_step = f"{prompts_per_step} reference solutions" if method == 'sft' else \
        f"{prompts_per_step} prompts x {n_samples} samples = {prompts_per_step * n_samples} sequences"
    print(f"{per_step} per step, {max_steps} steps")


def run(cfg):
    """The algorithm box: per step, rollouts -> teacher forward -> student forward/backward -> optimizer step
    -> weight sync -> log -> checkpoint."""
    import rollout
    check_settings()
    rank, world, dev = setup_distributed(device, dist_timeout_min)
    master = rank == 0
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)  # tiny CPU models: denormals made steps 4x slower
    warnings.filterwarnings('ignore', message='The value of the smallest subnormal')  # numpy, after the above

    # ---- weights, data and every check that needs them, before the sampler starts or out_dir is made
    resume_path = checkpoints_in(out_dir)[-1] if init_from == 'resume' else None
    state = read_resume(resume_path, DistillError) if resume_path else None
    m = load_models(resume_path or student, dev, master)
    stu, tea, plan, tok = m['stu'], m['tea'], m['plan'], m['tok']
    archs = {'student_arch': arch(stu.config), 'teacher_arch': arch(tea.config) if tea is not None else None}
    if state is not None:
        check_resume(state, cfg, world, stu.config, tea.config if tea is not None else None)
    items = load_prompts(tok)
    sampler = None if method == 'sft' else rollout.make_sampler(
        backend, m['student_path'], gpu_memory_utilization=gpu_memory_utilization, device=dev,
        tensor_parallel_size=tensor_parallel_size, seed=seed, max_model_len=max_prompt_len + max_new_tokens,
        enable_sleep_mode=dev.type == 'cuda' and method != 'bridge_fit')
    _samplers.append(sampler)
    if method == 'bridge_fit':  # OPRD-Bridge stage 1: both models frozen and replicated, no optimizer
        stu = stu.to(m['compute_dtype']).eval().requires_grad_(False)
        return fit_stage1(stu, tea, bridge_batches(sampler, items, rank, world, tok, dev), plan, cfg,
                          (m['student_path'], m['teacher_path']), dev)

    # ---- the student (and projector) under FSDP2, the optimizer, resumed state
    if m['proj'] is not None and state is None and projector_init == 'lstsq':  # on step 0's rollouts, replicated
        init_projector(m['proj'], stu, tea, next(bridge_batches(sampler, items, rank, world, tok, dev)), plan)
        sampler.wake()
    stu.activation_checkpointing = activation_checkpointing
    raw_stu, stu = stu, shard(stu, dev, m['compute_dtype'])
    if tea is not None and teacher_fsdp:
        tea = shard(tea, dev, m['compute_dtype'])
    proj = shard_projector(m['proj'], dev) if m['proj'] is not None else None
    opt, params = make_optimizer(stu, proj)
    start_step = state['step'] if state is not None else 0
    if state is not None:
        load_training_state(stu, proj, opt, state)
    filler = collate([(items[0]['prompt'], [tok.pad_id], 'stop')], tok.pad_id, dev)  # a zero-weight micro-batch
    if master:
        os.makedirs(out_dir, exist_ok=True)
        announce(m, world, len(items), f"resuming from {resume_path} at step {start_step}" if state else '')
    if wandb_log and master:
        import wandb
        wandb.init(project=wandb_project, config=cfg)

    mem, bad_steps = MemoryMeter(dev), 0
    for step in range(start_step, max_steps):
        # 1. rollouts of this rank's prompts with the current weights (reference solutions under sft)
        t0 = time.time()
        seqs = rollouts(sampler, items, step, rank, world, tok)
        t_rollout = time.time() - t0

        # 2-3. teacher forward (no grad), student forward and backward, over every micro-batch
        t1 = time.time()
        mem.start()
        lr_now = lr_at(step)
        for g in opt.param_groups:
            g['lr'] = lr_now
        st = accumulate_gradients(stu, tea, seqs, plan, proj, m['bridge'], filler, tok.pad_id, dev)

        # optimizer step, skipped when the loss or the gradient is not finite
        grad_norm = clip_grad_norm(params, grad_clip)
        loss = all_reduce_sum(st['loss']).item()
        bad_steps = 0 if math.isfinite(loss) and math.isfinite(grad_norm) else bad_steps + 1
        if bad_steps == 0:
            opt.step()
        elif master:
            print(f"step {step}: non-finite loss {loss} or grad norm {grad_norm}: step skipped "
                  f"({bad_steps} in a row)")
        opt.zero_grad(set_to_none=True)
        if dev.type == 'cuda':
            torch.cuda.synchronize()
        peak, t_update = all_reduce_max(mem.transient()), time.time() - t1

        # 4. push the new weights to the sampler (streamed one parameter at a time)
        if sampler is not None:
            sampler.wake()
            sampler.update_weights(rollout.fsdp_named_tensors(stu))

        if step % log_every == 0 or step == max_steps - 1:
            rec = log_record(step, st, lr_now, grad_norm, loss, seqs, t_rollout, t_update, peak, plan, sampler)
            if master:
                print_record(rec, plan)
                with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
                    f.write(json.dumps(rec) + '\n')
                if wandb_log:
                    wandb.log(rec, step=step)
        if bad_steps >= max_bad_steps:  # after the step's log line, so the log shows why the run stopped
            raise DistillError(f"{bad_steps} non-finite steps in a row: stopping")
        if (step + 1) % save_every == 0 or step == max_steps - 1:
            save_checkpoint(out_dir, keep_checkpoints, raw_stu, stu, opt, proj, step + 1, dict(archs, config=cfg))
        if stop_step and step + 1 >= stop_step:
            break
    dist.barrier()  # every rank's collectives (FSDP2's asynchronous reduce-scatters too) end before teardown
    if master:
        print(f"done: {(checkpoints_in(out_dir) or [out_dir])[-1]}")


def main():
    from configurator import ConfigError, apply_config
    keys = [k for k, v in globals().items() if not k.startswith('_') and k.islower()
            and isinstance(v, (int, float, bool, str, list, tuple, type(None)))]
    try:
        cfg = apply_config(sys.argv[1:], {k: globals()[k] for k in keys}, verbose=int(os.environ.get('RANK', 0)) == 0,
                           help_source=__file__)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    globals().update(cfg)
    try:
        run(cfg)
    except (DistillError, ValueError, OSError) as e:  # bad input (CheckpointError, DataError, BridgeError, a file)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        while _samplers:
            s = _samplers.pop()
            if s is not None:
                s.close()  # before the process group goes: vLLM's teardown would destroy the shared group
        if is_dist():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
