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

Per step: this rank's share of the step's prompts -> rollouts of the current student (rollout.py) -> teacher
forward (no grad) -> student forward + backward -> optimizer step -> new weights pushed to the sampler.
Under `oprd` alone neither model computes logits and the teacher runs only up to its deepest tapped layer.
"""
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from eval import checkpoints_in
from model import Transformer, resolve_checkpoint

# -----------------------------------------------------------------------------
# default config values, overridden by config/*.py and --key=value
out_dir = 'out'
init_from = 'scratch'         # 'scratch' (student from `student`) | 'resume' (newest checkpoint in out_dir)
student = ''                  # HF checkpoint folder of the student
teacher = ''                  # HF checkpoint folder of the frozen teacher
method = 'oprd'               # oprd | opd | opd_topk | opd_full | opd+oprd | opd_topk+oprd | sft
                              # | bridge_fit (OPRD-Bridge stage 1) | oprd_bridge (stage 2)
# data
prompts = 'dapo17k'           # benchmark name, builtin task name, or a .jsonl file (eval.load_problems)
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
tensor_parallel_size = 1
# OPRD (METHOD.md §2)
layers = 'all'                # last | all | even | odd | '4,8,12' (student layers, output_hidden_states indices)
positions = 'last_k'          # all | first_k | last_k
k_positions = 2000
distance = 'mse'              # mse (raw MSE / d) | normalized_mse (MSE of L2-normalised states)
align = 'predict'             # 'predict': the state that predicts token t (position t-1); 'token': the state at t
oprd_coef = 1.0
mu = 1.0                      # weight of OPRD in the combined objectives opd+oprd, opd_topk+oprd
projector = False             # learn a linear map d_S -> d_T per layer when the widths differ
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


class DistillError(ValueError):
    """A setting or input that cannot work; raised before any work is done."""


# ----------------------------------------------------------------------------- layer and position sets

def parse_layers(spec, num_layers):
    """Student layers to align, as output_hidden_states indices (1..L; 0 = embeddings is allowed if listed)."""
    L = num_layers
    named = {'last': [L], 'all': list(range(1, L + 1)), 'even': list(range(2, L + 1, 2)),
             'odd': list(range(1, L + 1, 2))}
    if isinstance(spec, str) and spec in named:
        return named[spec]
    try:
        out = [int(x) for x in (spec.split(',') if isinstance(spec, str) else spec)]
    except (TypeError, ValueError):
        raise DistillError(f"layers={spec!r}: expected last, all, even, odd or a list like 4,8,12") from None
    bad = [l for l in out if not 0 <= l <= L]
    if bad or not out:
        raise DistillError(f"layers {bad or out} out of range: the student has layers 0..{L}")
    return sorted(set(out))


def depth_map(layer, L_s, L_t):
    """phi(l): student layer -> teacher layer, round((l-1)(L_T-1)/(L_S-1)) + 1; 0 -> 0; identity when L_S = L_T."""
    if layer == 0 or L_s == L_t:
        return layer
    if L_s == 1:
        return L_t
    return math.floor((layer - 1) * (L_t - 1) / (L_s - 1) + 0.5) + 1


def response_masks(resp_mask, positions, k, align):
    """resp_mask (B, T) bool: response tokens. Returns the positions whose states are supervised.

    positions selects response tokens (all, the first k, the last k of each row, EOS included); align picks
    the position that carries token t: 'predict' = t-1 (the state that predicts t, as output-space OPD),
    'token' = t itself.
    """
    idx = resp_mask.long().cumsum(-1) - 1           # index of each response token within its row
    n = resp_mask.long().sum(-1, keepdim=True)      # response length per row
    if positions == 'all':
        keep = resp_mask
    elif positions == 'first_k':
        keep = resp_mask & (idx < k)
    elif positions == 'last_k':
        keep = resp_mask & (idx >= n - k)
    else:
        raise DistillError(f"positions={positions!r}: expected all, first_k or last_k")
    if align == 'predict':
        keep = torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], dim=1)
    elif align != 'token':
        raise DistillError(f"align={align!r}: expected predict or token")
    return keep


# ----------------------------------------------------------------------------- losses (sums; divided by a global count)

def oprd_loss(h_s, h_t, distance='mse', proj=None, t_proj=None):
    """Sum over rows of (1/d) ||h_S - sg(h_T)||^2, rows = supervised positions (N, d). Also the sum of cosines.

    With a projector, h_S is mapped to the teacher's width first; d is the width compared. Through a bridge,
    proj = P_S and t_proj = P_T(. - mu_T) map both sides to the bridge's r dimensions.
    """
    h_t = h_t.detach().float()
    if t_proj is not None:
        h_t = t_proj(h_t)
    h_s = h_s.float() if proj is None else proj(h_s.float())
    cos = F.cosine_similarity(h_s.detach(), h_t, dim=-1).sum()
    if distance == 'normalized_mse':
        h_s, h_t = F.normalize(h_s, dim=-1), F.normalize(h_t, dim=-1)
    elif distance != 'mse':
        raise DistillError(f"distance={distance!r}: expected mse or normalized_mse")
    return (h_s - h_t).pow(2).sum() / h_s.shape[-1], cos


def output_loss_chunk(kind, h_s, h_t, targets, w_s, w_t, vocab, k):
    """One chunk of output-space OPD: rows (n, d) of final-norm states, targets (n,) the sampled tokens.

    Returns (loss sum, KL-estimate sum). Log-probs are over the common vocabulary prefix, in fp32.
    """
    logp_s = F.log_softmax(F.linear(h_s, w_s)[:, :vocab].float(), dim=-1)
    with torch.no_grad():
        logp_t = F.log_softmax(F.linear(h_t, w_t)[:, :vocab].float(), dim=-1)
    if kind == 'opd':  # sampled token: REINFORCE with per-token advantage -sg(u_t)
        lp = logp_s.gather(1, targets[:, None])[:, 0]
        u = (lp - logp_t.gather(1, targets[:, None])[:, 0]).detach()
        return (u * lp).sum(), u.sum()
    if kind == 'opd_topk':  # the student's top-k, probabilities renormalised on it
        top_lp, top_i = logp_s.detach().topk(k, dim=-1)
        p_bar = top_lp.softmax(-1)
        lp = logp_s.gather(1, top_i)
        diff = (lp - logp_t.gather(1, top_i)).detach()
        return (p_bar * diff * lp).sum(), (p_bar * diff).sum()
    if kind == 'opd_full':  # exact reverse KL(p || q) over the vocabulary
        kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
        return kl.sum(), kl.detach().sum()
    raise DistillError(f"unknown output loss {kind!r}")


def output_loss(kind, h_s, h_t, targets, w_s, w_t, vocab, k, chunk):
    """Output-space loss over all rows, chunk rows at a time; each chunk's logits are recomputed in backward
    (activation checkpointing), so no (rows, V) tensor of the whole batch ever exists."""
    loss, kl = h_s.new_zeros((), dtype=torch.float32), 0.0
    for i in range(0, h_s.shape[0], chunk):
        sl = slice(i, i + chunk)
        args = (kind, h_s[sl], h_t[sl], targets[sl], w_s, w_t, vocab, k)
        if torch.is_grad_enabled():
            l, e = torch.utils.checkpoint.checkpoint(output_loss_chunk, *args, use_reentrant=False)
        else:
            l, e = output_loss_chunk(*args)
        loss, kl = loss + l, kl + e.item()
    return loss, kl


def sft_loss(logits, targets):
    """Summed cross-entropy of the reference tokens; logits (n, V) at the predicting positions."""
    return F.cross_entropy(logits.float(), targets, reduction='sum')


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
            k = str(ls)
            if bridge is not None:
                maps = bridge.student[k], bridge.teacher[k]
            else:
                maps = proj[k] if proj is not None else None, None
            l_sum, cos = oprd_loss(hs_s[ls][m], hs_t[lt][m], plan.distance, *maps)
            rep = rep + l_sum / len(plan.s_layers)
            stats['layer_loss'].append(l_sum.item())
            stats['layer_cos'].append(cos.item())
        loss = loss + plan.oprd_weight * rep / max(n_rep, 1)
    return loss, stats


# ----------------------------------------------------------------------------- OPRD-Bridge (METHOD.md §4)

def pca(rows):
    """Principal directions of rows (N, d), in fp64: the mean (d,) and all min(N, d) directions (k, d), orthonormal,
    by decreasing variance. Each direction's largest-magnitude entry is made positive, so the result is unique."""
    x = rows.double()
    mean = x.mean(0)
    vh = torch.linalg.svd(x - mean, full_matrices=False).Vh
    return mean, vh * vh.gather(1, vh.abs().argmax(1, keepdim=True)).sign()


def mean_cos(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def fit_projector(x, y, x_val, y_val, lr=1e-4, epochs=20, batch_size=256, seed=0, init=None):
    """P_S (r, d_S), no bias, trained by AdamW (weight decay 0) on the mean of ||P_S x - y||^2 over shuffled
    mini-batches of (x (N, d_S), y (N, r)), from `init` or nn.Linear's uniform init. Returns the weights of the
    epoch with the best held-out cosine (the initial weights included) and that cosine."""
    g = torch.Generator().manual_seed(seed)
    d_s = x.shape[1]
    w = (torch.rand(y.shape[1], d_s, generator=g) * 2 - 1) / math.sqrt(d_s) if init is None else init.float().cpu()
    w = w.to(x.device).requires_grad_(True)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    best, best_cos = w.detach().clone(), mean_cos(x_val @ w.detach().T, y_val)
    for _ in range(epochs):
        for i in torch.randperm(len(x), generator=g).to(x.device).split(batch_size):
            loss = (x[i] @ w.T - y[i]).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        c = mean_cos(x_val @ w.detach().T, y_val)
        if c > best_cos:
            best, best_cos = w.detach().clone(), c
    return best, best_cos


def lstsq_map(x, yc):
    """The least-squares linear map W (d_S, d_T) from student rows x (N, d_S) to centred teacher rows yc (N, d_T),
    closed form in fp64 with a ridge of 1e-6 x the mean eigenvalue of x^T x. The best rank-r P_S is P_T W^T."""
    x, yc = x.double(), yc.double()
    gram = x.T @ x
    gram.diagonal().add_(1e-6 * gram.diagonal().mean() + 1e-12)
    return torch.linalg.solve(gram, x.T @ yc)


def sweep_ranks(k):
    """The ranks of the cosine-by-rank table: 1, 4, 8, 16, ... below k, then k (full rank)."""
    return [1] + [2 ** i for i in range(2, 30) if 2 ** i < k] + [k] if k > 1 else [1]


def cos_by_rank(x_val, yc_val, w, components, ranks):
    """Held-out cosine of the bridge at each rank with the least-squares P_S (w from lstsq_map): one map serves
    every rank, the coordinates in the PCA basis (components (k, d_T)) truncated to the first r. (At r = 1 the
    cosine is +-1 per row: the rate of sign agreement.)"""
    pred, target = x_val.double() @ w @ components.T, yc_val.double() @ components.T  # (n_val, k)
    return {r: mean_cos(pred[:, :r], target[:, :r]) for r in ranks}


def fit_bridge_layer(h_s, h_t, rank, max_rows=16384, holdout=0.1, seed=0, init='random', **train):
    """Stage 1 for one layer pair: h_s (N, d_S), h_t (N, d_T) rows at the same positions. At most max_rows rows
    (a seeded random subset); a fraction `holdout` of them is held out, the PCA and P_S are fit on the rest.
    P_S starts from nn.Linear's init ('random', the paper) or the least-squares solution ('lstsq').
    Returns mu_T (d_T,), P_T (rank, d_T), P_S (rank, d_S), P_S's held-out cosine, and {r: held-out cosine} of
    the least-squares P_S at the ranks of sweep_ranks and at `rank`."""
    perm = torch.randperm(len(h_s), generator=torch.Generator().manual_seed(seed))[:max_rows].to(h_s.device)
    n_val = max(1, round(holdout * len(perm)))
    val, tr = perm[:n_val], perm[n_val:]
    mean, comps = pca(h_t[tr])
    if rank > comps.shape[0]:
        raise DistillError(f"bridge_rank={rank} but the PCA has only {comps.shape[0]} directions "
                           f"({len(tr)} training rows, teacher width {h_t.shape[1]}): collect more rows")
    yc, yc_val = h_t[tr].double() - mean, h_t[val].double() - mean
    w = lstsq_map(h_s[tr], yc)
    p_t = comps[:rank]
    p_s, cos = fit_projector(h_s[tr].float(), (yc @ p_t.T).float(), h_s[val].float(), (yc_val @ p_t.T).float(),
                             seed=seed, init=p_t @ w.T if init == 'lstsq' else None, **train)
    ranks = sorted(set(sweep_ranks(comps.shape[0])) | {rank})
    return mean.float(), p_t.float(), p_s, cos, cos_by_rank(h_s[val], yc_val, w, comps, ranks)


class PCAProjection(nn.Module):
    """The teacher side of the bridge: h_T (..., d_T) -> P_T (h_T - mu_T) (..., r)."""

    def __init__(self, mean, components):
        super().__init__()
        self.register_buffer('mean', mean)
        self.register_buffer('components', components)

    def forward(self, h):
        return (h - self.mean) @ self.components.T


class Bridge(nn.Module):
    """The frozen OPRD-Bridge, keyed by student layer: student[l](h_S) = P_S h_S and teacher[l](h_T) =
    P_T (h_T - mu_T), both in R^r. fits: {layer: (mu_T, P_T, P_S)}. Nothing in it learns in stage 2."""

    def __init__(self, fits):
        super().__init__()
        self.student, self.teacher = nn.ModuleDict(), nn.ModuleDict()
        for l, (mean, p_t, p_s) in fits.items():
            self.student[str(l)] = nn.Linear(p_s.shape[1], p_s.shape[0], bias=False)
            self.student[str(l)].weight = nn.Parameter(p_s.float(), requires_grad=False)
            self.teacher[str(l)] = PCAProjection(mean.float(), p_t.float())


def arch(cfg):
    """What a bridge must match in a model: its architecture, width, depth and vocabulary."""
    return {k: getattr(cfg, k) for k in ('model_type', 'hidden_size', 'num_hidden_layers', 'vocab_size')}


def save_bridge(path, bridge, meta):
    """path/bridge.safetensors (student.<l>.weight = P_S, teacher.<l>.mean = mu_T, teacher.<l>.components = P_T)
    + path/bridge.json (meta: rank, layers, both models' arch, the fit's settings and cosines). Written beside
    the target and renamed into place."""
    from safetensors.torch import save_file
    partial = path.rstrip('/') + '.partial'
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    save_file({k: v.detach().cpu().contiguous() for k, v in bridge.state_dict().items()},
              os.path.join(partial, 'bridge.safetensors'))
    with open(os.path.join(partial, 'bridge.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(partial, path)


def load_bridge(path):
    """(Bridge, meta) from a folder written by save_bridge; one-line DistillErrors for a missing or broken one."""
    from safetensors.torch import load_file
    files = [os.path.join(path, n) for n in ('bridge.safetensors', 'bridge.json')]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DistillError(f"no bridge file {missing[0]!r}: fit the bridge first with method=bridge_fit")
    try:
        with open(files[1]) as f:
            meta = json.load(f)
        sd = load_file(files[0])
        bridge = Bridge({l: (sd[f'teacher.{l}.mean'], sd[f'teacher.{l}.components'], sd[f'student.{l}.weight'])
                         for l in meta['student_layers']})
    except Exception as e:  # a missing key or tensor, bad JSON, a truncated safetensors file
        raise DistillError(f"corrupt bridge in {path!r}: {type(e).__name__} {e}") from None
    return bridge, meta


def check_bridge(meta, path, plan, stu_cfg, tea_cfg):
    """The bridge must have been fit for these two models and cover every aligned layer with the same phi."""
    for side, cfg in (('student', stu_cfg), ('teacher', tea_cfg)):
        if meta.get(side) != arch(cfg):
            raise DistillError(f"bridge {path!r} was fit for the {side} {meta.get(side)}, not this run's {side} "
                               f"{arch(cfg)}: refit it with method=bridge_fit")
    fit = dict(zip(meta['student_layers'], meta['teacher_layers']))
    bad = [(ls, lt) for ls, lt in zip(plan.s_layers, plan.t_layers) if fit.get(ls) != lt]
    if bad:
        raise DistillError(f"bridge {path!r} was fit for layers {meta['student_layers']} -> teacher "
                           f"{meta['teacher_layers']}; it has no map for {bad} (student -> teacher): "
                           "refit it with method=bridge_fit, or choose layers it covers")


# ----------------------------------------------------------------------------- small utilities

def is_dist():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(x):
    """Sum a float (or tensor) over ranks; a no-op in a single process."""
    t = torch.as_tensor(x, dtype=torch.float64, device=_device()).clone()
    if is_dist():
        dist.all_reduce(t)
    return t


def _device():
    return torch.device('cuda', torch.cuda.current_device()) if torch.cuda.is_available() else torch.device('cpu')


def lr_at(step):
    """Linear warm-up over warmup_frac of the run, then cosine decay to min_lr."""
    warmup = max(1, math.ceil(warmup_frac * max_steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


class MemoryMeter:
    """Transient peak memory of a region: peak during it minus memory at its start (the paper's Table 3).

    GPU: the caching allocator's counters. CPU: the process's resident set (VmHWM after a reset through
    /proc/self/clear_refs), a process-level measure that also sees allocator reuse.
    """

    def __init__(self, device):
        self.cuda = device.type == 'cuda'

    @staticmethod
    def _status(key):
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')  # resets VmHWM to the current RSS
            except OSError:
                pass
            self.base = self._status('VmRSS')

    def transient(self):
        peak = torch.cuda.max_memory_allocated() if self.cuda else self._status('VmHWM')
        return max(0, peak - self.base)


# ----------------------------------------------------------------------------- the run

def main():
    global_keys = [k for k, v in globals().items()
                   if not k.startswith('_') and isinstance(v, (int, float, bool, str, list, tuple, type(None)))
                   and k not in ('METHODS',)]
    from configurator import ConfigError, apply_config
    try:
        cfg = apply_config(sys.argv[1:], {k: globals()[k] for k in global_keys},
                           verbose=int(os.environ.get('RANK', 0)) == 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    globals().update(cfg)
    try:
        run(cfg)
    except (DistillError, ValueError, OSError) as e:  # bad input (CheckpointError, DataError, a missing file)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if is_dist():
            dist.destroy_process_group()


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE: one process per device, FSDP2 over all of them. Plain python: no group."""
    if 'RANK' not in os.environ:
        return 0, 1, _device()
    backend_name = 'nccl' if torch.cuda.is_available() else 'gloo'
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
    dist.init_process_group(backend_name)
    return dist.get_rank(), dist.get_world_size(), _device()


def shard(model, device, mp_dtype, reshard=True):
    """FSDP2: fully_shard each block, then the root. bf16 compute with fp32 reduction on GPU; fp32 on CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def run(cfg):
    import eval as evaluation
    import rollout

    if method not in METHODS:
        raise DistillError(f"method={method!r} does not exist: choose one of {', '.join(METHODS)}")
    rank, world, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)  # tiny CPU models: denormals made steps 4x slower
    warnings.filterwarnings('ignore', message='The value of the smallest subnormal')  # numpy, after the above
    on_gpu = device.type == 'cuda'
    compute_dtype = torch.bfloat16 if on_gpu else torch.float32

    # ---- resume or start: find the weights to load
    resume_state, start_step = None, 0
    student_path = student
    if init_from == 'resume':
        found = checkpoints_in(out_dir)
        if not found:
            raise DistillError(f"init_from='resume' but {out_dir!r} has no checkpoint")
        student_path = found[-1]
        resume_state = torch.load(os.path.join(student_path, 'resume.pt'), weights_only=False)
        start_step = resume_state['step']
        if master:
            print(f"resuming from {student_path} at step {start_step}")
    elif init_from != 'scratch':
        raise DistillError(f"init_from={init_from!r}: expected scratch or resume")
    if not student_path:
        raise DistillError("no student checkpoint: set student=<HF folder>")

    # ---- models, tokenizers, and every check that can fail before any work
    from model import CheckpointError
    teacher_path = teacher
    try:
        student_path = resolve_checkpoint(student_path)  # a hub id is downloaded once, then used as a folder
        stu = Transformer.from_pretrained(student_path, dtype=torch.float32, device=device)
        tea = None
        if method != 'sft':
            if not teacher:
                raise DistillError(f"method={method} needs a teacher: set teacher=<HF folder>")
            teacher_path = resolve_checkpoint(teacher)
            tea = Transformer.from_pretrained(teacher_path, dtype=compute_dtype, device=device).eval()
            tea.requires_grad_(False)
    except CheckpointError as e:
        raise DistillError(str(e)) from None
    tok = rollout.load_tokenizer(student_path)
    if tea is not None and not rollout.same_tokenization(tok, rollout.load_tokenizer(teacher_path)):
        raise DistillError(f"teacher {teacher!r} and student {student_path!r} tokenize differently: "
                           "OPRD and OPD need identical rollout token ids")
    plan = make_plan(method, stu.config, tea.config if tea is not None else None, layers, positions, k_positions,
                     align, distance, oprd_coef, mu, topk, vocab_chunk_tokens)
    proj, bridge = None, None
    if tea is not None:
        d_s, d_t = stu.config.hidden_size, tea.config.hidden_size
        if method in ('bridge_fit', 'oprd_bridge'):
            if not bridge_path:
                raise DistillError(f"method={method} needs bridge_path=<folder of the bridge>")
            if projector:
                raise DistillError(f"method={method} with projector=True: the bridge replaces the projector")
        if method == 'bridge_fit' and bridge_init not in ('random', 'lstsq'):
            raise DistillError(f"bridge_init={bridge_init!r}: expected random or lstsq")
        if method == 'bridge_fit' and not 1 <= bridge_rank <= min(d_s, d_t):
            raise DistillError(f"bridge_rank={bridge_rank} is above the width: it must be 1..{min(d_s, d_t)} "
                               f"(student width {d_s}, teacher width {d_t})")
        if method == 'oprd_bridge':
            bridge, bridge_meta = load_bridge(bridge_path)
            check_bridge(bridge_meta, bridge_path, plan, stu.config, tea.config)
            bridge = bridge.to(device)
        elif plan.s_layers and d_s != d_t and method != 'bridge_fit':
            if not projector:
                raise DistillError(f"teacher width {d_t} != student width {d_s}: set projector=True, or fit a "
                                   "bridge (method=bridge_fit) and use method=oprd_bridge")
            proj = nn.ModuleDict({str(l): nn.Linear(d_s, d_t, bias=False) for l in plan.s_layers}).to(device)
        if plan.out_kind and stu.config.vocab_size != tea.config.vocab_size and master:
            print(f"vocabularies differ ({stu.config.vocab_size} vs {tea.config.vocab_size}): "
                  f"comparing the common prefix of {plan.vocab}")

    problems = evaluation.load_problems(prompts, data_dir or None)
    data = []
    for p in problems:
        ids = tok.chat(evaluation.build_prompt(p), enable_thinking=enable_thinking)
        if len(ids) > max_prompt_len:
            continue
        item = {'id': p['id'], 'prompt': ids}
        if method == 'sft':
            if not p.get('solution'):
                raise DistillError(f"method=sft needs reference solutions; {prompts!r} has none for {p['id']!r}")
            item['response'] = tok.encode(p['solution']) + tok.eos_ids[:1]
        data.append(item)
    if not data:
        raise DistillError(f"no prompt of {prompts!r} fits max_prompt_len={max_prompt_len}")

    if method == 'bridge_fit':  # OPRD-Bridge stage 1: both models frozen and replicated, no optimizer
        return fit_bridge(stu.to(compute_dtype), tea, tok, data, plan, rank, world, device, student_path,
                          teacher_path)

    # ---- the student under FSDP2, optimizer, sampler
    stu.activation_checkpointing = activation_checkpointing
    raw_stu = stu
    if is_dist():
        stu = shard(stu, device, compute_dtype)
        if tea is not None and teacher_fsdp:
            tea = shard(tea, device, compute_dtype)
    params = list(stu.parameters()) + (list(proj.parameters()) if proj is not None else [])
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay},
                             {'params': no_decay, 'weight_decay': 0.0}], lr=lr, betas=(beta1, beta2),
                            fused=on_gpu)
    if resume_state is not None:
        load_optimizer(stu, proj, opt, resume_state['optimizer'])
        if proj is not None:
            proj.load_state_dict(resume_state['projector'])
        torch.set_rng_state(resume_state['rng'])
    if proj is not None and is_dist():
        for p in proj.parameters():  # identical start on every rank (its gradients are all-reduced below)
            dist.broadcast(p.data, 0)

    sampler = None
    if method != 'sft':
        sampler = rollout.make_sampler(backend, student_path, gpu_memory_utilization=gpu_memory_utilization,
                                       tensor_parallel_size=tensor_parallel_size, seed=seed,
                                       max_model_len=max_prompt_len + max_new_tokens,
                                       enable_sleep_mode=on_gpu)
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print(f"method {method} | student {student_path} ({plan.L_s} layers, d={stu.config.hidden_size}) | "
              f"teacher {teacher or '-'} | world {world} | {len(data)} prompts")
        if plan.s_layers:
            print(f"OPRD layers {plan.s_layers} -> teacher {plan.t_layers}; positions {positions}"
                  f"{'' if positions == 'all' else f' (k={k_positions})'}; distance {distance}; align {align}")
        if bridge is not None:
            print(f"through the frozen bridge {bridge_path}: rank {bridge_meta['rank']}, held-out cosine "
                  f"{sum(bridge_meta['heldout_cos'].values()) / len(bridge_meta['heldout_cos']):.4f} (mean)")
        print(f"prompts per step {prompts_per_step} x {n_samples} samples = "
              f"{prompts_per_step * n_samples} sequences per step, {max_steps} steps")
    if wandb_log and master:
        import wandb
        wandb.init(project=wandb_project, config=cfg)
    log_path = os.path.join(out_dir, 'log.jsonl')

    mem = MemoryMeter(device)
    bad_steps = 0
    for step in range(start_step, max_steps):
        # ---- 1. this rank's prompts: a seeded permutation per epoch, the step's slice, every world-th item
        step_items = step_prompts(data, step, rank, world)

        # ---- 2. rollouts with the current weights (or the reference solutions under sft)
        t0 = time.time()
        seqs = []  # (prompt ids, response ids, finish)
        if method == 'sft':
            seqs = [(it['prompt'], it['response'], 'stop') for it in step_items]
        else:
            samples = sampler.generate([it['prompt'] for it in step_items], n=n_samples, temperature=temperature,
                                       top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                       stop_ids=tok.eos_ids, seed=seed * 1_000_003 + step * world + rank)
            sampler.sleep()
            seqs = [(it['prompt'], s.tokens, s.finish) for it, ss in zip(step_items, samples) for s in ss]
        t_rollout = time.time() - t0
        gen_tokens = all_reduce_sum(sum(len(r) for _, r, _ in seqs)).item()
        truncated = all_reduce_sum(sum(f == 'length' for _, _, f in seqs)).item()
        n_seqs = all_reduce_sum(len(seqs)).item()

        # ---- 3. teacher forward, student forward and backward, accumulated over micro-batches
        t1 = time.time()
        mem.start()
        lr_now = lr_at(step)
        for g in opt.param_groups:
            g['lr'] = lr_now
        stu.train()
        batches = [collate(seqs[i:i + micro_batch_size], tok.pad_id, device)
                   for i in range(0, len(seqs), micro_batch_size)]
        # the loss is divided by the all-reduced count of supervised tokens, so sharding does not change it;
        # FSDP averages gradients over ranks, hence the factor world
        n_out = all_reduce_sum(sum(b['out_mask'].sum().item() for b in batches)).item()
        n_rep = all_reduce_sum(sum(response_masks(b['resp'], positions, k_positions, align).sum().item()
                                   for b in batches)).item() if plan.s_layers else 0.0
        stats = {'loss': 0.0, 'kl': 0.0, 'update_tokens': 0}
        layer_loss = [0.0] * len(plan.s_layers)
        layer_cos = [0.0] * len(plan.s_layers)
        for mi, b in enumerate(batches):
            if is_dist():  # reduce gradients only after the last micro-batch
                stu.set_requires_gradient_sync(mi == len(batches) - 1)
            loss, ms = micro_batch_loss(stu, tea, b, plan, proj, n_out, n_rep, bridge)
            (loss * world).backward()
            stats['loss'] += loss.item()
            stats['kl'] += ms['kl']
            stats['update_tokens'] += b['attn'].sum().item()
            for j in range(len(plan.s_layers)):
                layer_loss[j] += ms['layer_loss'][j]
                layer_cos[j] += ms['layer_cos'][j]
        if proj is not None and is_dist():  # the projector is not under FSDP: reduce its gradients here
            for p in proj.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        grad_norm = clip_grad_norm(params, grad_clip)
        loss_total = all_reduce_sum(stats['loss']).item()
        if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
            bad_steps += 1
            opt.zero_grad(set_to_none=True)
            if master:
                print(f"step {step}: non-finite loss {loss_total} or grad norm {grad_norm}: step skipped "
                      f"({bad_steps} in a row)")
        else:
            bad_steps = 0
            opt.step()
            opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        transient = all_reduce_max(mem.transient())
        t_update = time.time() - t1

        # ---- 4. push the new weights to the sampler (streamed one parameter at a time)
        if sampler is not None:
            sampler.wake()
            sampler.update_weights(rollout.fsdp_named_tensors(stu))

        # ---- log
        if step % log_every == 0 or step == max_steps - 1:
            rec = {'step': step, 'loss': loss_total, 'grad_norm': grad_norm, 'lr': lr_now,
                   'mean_response_len': gen_tokens / max(n_seqs, 1), 'trunc_rate': truncated / max(n_seqs, 1),
                   'update_tok_s': all_reduce_sum(stats['update_tokens']).item() / max(all_reduce_max(t_update), 1e-9),
                   'update_transient_mem_mb': transient / 2**20}
            if sampler is not None:
                rec['rollout_tok_s'] = gen_tokens / max(all_reduce_max(t_rollout), 1e-9)
            if plan.s_layers:
                for j, l in enumerate(plan.s_layers):
                    rec[f'oprd_loss/{l}'] = all_reduce_sum(layer_loss[j]).item() / max(n_rep, 1)
                    rec[f'cos/{l}'] = all_reduce_sum(layer_cos[j]).item() / max(n_rep, 1)
            if plan.out_kind:
                rec['kl'] = all_reduce_sum(stats['kl']).item() / max(n_out, 1)
            if master:
                extra = f" | kl {rec['kl']:.4f}" if plan.out_kind else ''
                if plan.s_layers:
                    extra += f" | cos {sum(rec[f'cos/{l}'] for l in plan.s_layers) / len(plan.s_layers):.4f}"
                if sampler is not None:
                    extra += f" | rollout {rec['rollout_tok_s']:.0f} tok/s"
                print(f"step {step}: loss {loss_total:.6f} | grad {grad_norm:.3f} | lr {lr_now:.2e} | "
                      f"len {rec['mean_response_len']:.1f} | trunc {rec['trunc_rate']:.2f}{extra} | "
                      f"update {rec['update_tok_s']:.0f} tok/s | mem +{rec['update_transient_mem_mb']:.1f} MB")
                with open(log_path, 'a') as f:
                    f.write(json.dumps(rec) + '\n')
                if wandb_log:
                    wandb.log(rec, step=step)

        if bad_steps >= max_bad_steps:  # after the step's log line, so the log shows why the run stopped
            if sampler is not None:
                sampler.close()
            raise DistillError(f"{bad_steps} non-finite steps in a row: stopping")
        if (step + 1) % save_every == 0 or step == max_steps - 1:
            save_checkpoint(raw_stu, stu, opt, proj, step + 1, cfg)
        if stop_step and step + 1 >= stop_step:
            break
    if sampler is not None:
        sampler.close()  # before the process group goes: vLLM's teardown would destroy the shared group
    if master:
        print(f"done: {checkpoints_in(out_dir)[-1] if checkpoints_in(out_dir) else out_dir}")


def step_prompts(data, step, rank, world):
    """This rank's prompts of a step: a seeded permutation per epoch, the step's slice, every world-th item."""
    per_epoch = max(1, len(data) // prompts_per_step)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [data[i] for i in order[pos * prompts_per_step:(pos + 1) * prompts_per_step]][rank::world]


def fit_bridge(stu, tea, tok, data, plan, rank, world, device, student_path, teacher_path):
    """OPRD-Bridge stage 1 (METHOD.md §4), both models frozen. Rollouts of the student on the training prompts
    (the same order and seeds as the training steps) until bridge_rows rows per layer are collected over all
    ranks, or one pass over the prompts; a row is a position that stage 2 supervises (positions, k_positions,
    align), i.e. response tokens only. Every rank's rows are gathered; layer j is fit by rank j % world and
    broadcast, so the bridge is identical on every rank. Rank 0 writes it to bridge_path."""
    import rollout
    stu.eval().requires_grad_(False)
    sampler = rollout.make_sampler(backend, student_path, gpu_memory_utilization=gpu_memory_utilization,
                                   tensor_parallel_size=tensor_parallel_size, seed=seed,
                                   max_model_len=max_prompt_len + max_new_tokens, enable_sleep_mode=False)
    rows = {l: ([], []) for l in plan.s_layers}  # student layer -> (student rows, teacher rows), on the CPU
    n_rows, step, t0 = 0, 0, time.time()
    while n_rows < bridge_rows and step < max(1, len(data) // prompts_per_step):
        items = step_prompts(data, step, rank, world)
        samples = sampler.generate([it['prompt'] for it in items], n=n_samples, temperature=temperature,
                                   top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                                   stop_ids=tok.eos_ids, seed=seed * 1_000_003 + step * world + rank)
        seqs = [(it['prompt'], s.tokens, s.finish) for it, ss in zip(items, samples) for s in ss]
        n_local = 0
        for i in range(0, len(seqs), micro_batch_size):
            b = collate(seqs[i:i + micro_batch_size], tok.pad_id, device)
            m = response_masks(b['resp'], positions, k_positions, align)
            with torch.no_grad():
                hs_t = tea(b['idx'], attention_mask=b['attn'], taps=plan.t_taps)
                hs_s = stu(b['idx'], attention_mask=b['attn'], taps=plan.s_taps)
            for ls, lt in zip(plan.s_layers, plan.t_layers):
                rows[ls][0].append(hs_s[ls][m].float().cpu())
                rows[ls][1].append(hs_t[lt][m].float().cpu())
            n_local += m.sum().item()
        n_rows += all_reduce_sum(n_local).item()
        step += 1
    sampler.close()
    if n_rows < 2 * bridge_rank + 10:
        raise DistillError(f"stage 1 collected only {int(n_rows)} rows per layer: too few for a rank-{bridge_rank} "
                           "bridge (more prompts, samples or max_new_tokens)")
    if rank == 0:
        print(f"stage 1: {int(n_rows)} rows per layer from {step} rollout steps in {time.time() - t0:.1f} s; "
              f"fitting {len(plan.s_layers)} layers at rank {bridge_rank}")

    fits, t1 = {}, time.time()
    for j, l in enumerate(plan.s_layers):
        h_s, h_t = (gather_rows(torch.cat(r), device) for r in rows.pop(l))
        if j % world == rank:
            fits[l] = (h_s, h_t)
    for l, (h_s, h_t) in fits.items():
        out = fit_bridge_layer(h_s, h_t, bridge_rank, bridge_rows, seed=seed + l, init=bridge_init, lr=bridge_lr,
                               epochs=bridge_epochs, batch_size=bridge_batch_size)
        fits[l] = [t.cpu() if torch.is_tensor(t) else t for t in out]
    if is_dist():
        for j, l in enumerate(plan.s_layers):  # the owner's fit to every rank (pickled CPU tensors)
            obj = [fits.get(l)]
            dist.broadcast_object_list(obj, src=j % world)
            fits[l] = obj[0]
    bridge = Bridge({l: fits[l][:3] for l in plan.s_layers})
    checksum = sum(t.double().sum().item() + t.double().abs().sum().item() for t in bridge.state_dict().values())
    if all_reduce_max(checksum) != -all_reduce_max(-checksum):
        raise RuntimeError("the bridge differs between ranks")
    heldout = {str(l): fits[l][3] for l in plan.s_layers}
    by_rank = {str(l): {str(r): c for r, c in fits[l][4].items()} for l in plan.s_layers}
    ranks = list(fits[plan.s_layers[0]][4])
    mean_by_rank = {str(r): sum(by_rank[str(l)][str(r)] for l in plan.s_layers) / len(plan.s_layers) for r in ranks}
    meta = {'rank': bridge_rank, 'student_layers': plan.s_layers, 'teacher_layers': plan.t_layers,
            'student': arch(stu.config), 'teacher': arch(tea.config), 'student_path': student_path,
            'teacher_path': teacher_path, 'rows_collected': int(n_rows), 'rows': int(min(n_rows, bridge_rows)),
            'holdout': 0.1, 'positions': positions, 'k_positions': k_positions, 'align': align, 'lr': bridge_lr,
            'epochs': bridge_epochs, 'batch_size': bridge_batch_size, 'init': bridge_init, 'seed': seed,
            'heldout_cos': heldout, 'cos_by_rank': by_rank, 'cos_by_rank_mean': mean_by_rank}
    if rank == 0:
        print(f"bridge identical on {world} rank(s) (checksum {checksum:.12e}); fit in {time.time() - t1:.1f} s")
        for ls, lt in zip(plan.s_layers, plan.t_layers):
            print(f"layer {ls} -> teacher {lt}: held-out cosine {heldout[str(ls)]:.4f} at rank {bridge_rank} "
                  f"(least squares: {fits[ls][4][bridge_rank]:.4f})")
        print(f"held-out cosine by rank (least-squares P_S, mean over {len(plan.s_layers)} layers; "
              f"full rank = {ranks[-1]}):")
        print('  rank ' + ' '.join(f'{r:>7}' for r in ranks))
        print('  cos  ' + ' '.join(f'{mean_by_rank[str(r)]:7.4f}' for r in ranks))
        save_bridge(bridge_path, bridge, meta)
        print(f"saved {bridge_path}")
    if is_dist():
        dist.barrier()
    return bridge, meta


def gather_rows(x, device):
    """All ranks' rows (n_rank, d), concatenated in rank order, on every rank; a copy in one process."""
    if not is_dist():
        return x.to(device)
    x = x.to(device)
    n = torch.tensor([len(x)], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    n_max = int(max(s.item() for s in sizes))
    padded = torch.cat([x, x.new_zeros(n_max - len(x), x.shape[1])])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:int(s.item())] for o, s in zip(out, sizes)])


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


def all_reduce_max(x):
    t = torch.tensor(float(x), dtype=torch.float64, device=_device())
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def clip_grad_norm(params, max_norm):
    """Global grad norm over ranks, clipped to max_norm; returns the norm before clipping.

    FSDP2 grads are DTensor shards (their norm is reduced over ranks by full_tensor()); the projector's are
    plain tensors, already all-reduced. The two kinds are normed separately and combined.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sq = 0.0
    for kind in (True, False):
        gs = [g for g in grads if hasattr(g, 'full_tensor') == kind]
        if gs:
            n = torch.nn.utils.get_total_norm(gs)
            sq += (n.full_tensor() if hasattr(n, 'full_tensor') else n).item() ** 2
    norm = math.sqrt(sq)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def trained_modules(model, proj):
    """Everything the optimizer updates, as one module: the state-dict API maps optimizer state by its names."""
    return model if proj is None else nn.ModuleDict({'student': model, 'projector': proj})


def load_optimizer(model, proj, opt, state):
    if is_dist():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(trained_modules(model, proj), opt, state, options=opts)
    else:
        opt.load_state_dict(state)


def save_checkpoint(raw_model, model, opt, proj, step, cfg):
    """out_dir/step_NNNNNNN: the student in HF format + resume.pt. Written as step_N.partial and renamed, so a
    crash mid-save leaves the previous checkpoint whole; older ones beyond keep_checkpoints are removed."""
    if is_dist():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(trained_modules(model, proj), opt, options=opts)
    else:
        sd, osd = model.state_dict(), opt.state_dict()
    if is_dist() and dist.get_rank() != 0:
        dist.barrier()
        return
    final = os.path.join(out_dir, f'step_{step:07d}')
    partial = final + '.partial'
    shutil.rmtree(partial, ignore_errors=True)
    raw_model.save_pretrained(partial, state_dict=sd)
    torch.save({'step': step, 'optimizer': osd, 'projector': proj.state_dict() if proj is not None else None,
                'rng': torch.get_rng_state(), 'config': cfg}, os.path.join(partial, 'resume.pt'))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in checkpoints_in(out_dir)[:-keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    print(f"saved {final}")
    if is_dist():
        dist.barrier()


if __name__ == '__main__':
    main()
