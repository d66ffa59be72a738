"""
The objectives (METHOD.md §2-3): which layers OPRD aligns (the Plan), the OPRD loss on hidden
states, and the output-space OPD losses (sampled-token, top-k, full-vocabulary KL), computed in
chunks of positions so no (tokens x vocabulary) tensor of a batch ever exists. Every loss is a sum
over supervised positions; at the bottom, micro_batch_loss composes them for one micro-batch
(batch.Batch), divided by the step's global counts.

    plan = make_plan('oprd', student.config, teacher.config, layers='all', positions='last_k')
    loss, stats = micro_batch_loss(plan, batch, student_taps, teacher_rows, counts, Maps(...))
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from batch import DistillError


# ----------------------------------------------------------------------------- which layers

def parse_layers(spec, num_layers):
    """Student layers to align, as output_hidden_states indices (1..L; 0 = embeddings is
    allowed if listed)."""
    L = num_layers
    named = {'last': [L], 'all': list(range(1, L + 1)), 'even': list(range(2, L + 1, 2)),
             'odd': list(range(1, L + 1, 2))}
    if isinstance(spec, str) and spec in named:
        return named[spec]
    try:
        out = [int(x) for x in (spec.split(',') if isinstance(spec, str) else spec)]
    except (TypeError, ValueError):
        raise DistillError(f"layers={spec!r}: expected last, all, even, odd "
                           "or a list like 4,8,12") from None
    bad = [l for l in out if not 0 <= l <= L]
    if bad or not out:
        raise DistillError(f"layers {bad or out} out of range: the student has layers 0..{L}")
    return sorted(set(out))


def depth_map(layer, L_s, L_t):
    """phi(l): student layer -> teacher layer, round((l-1)(L_T-1)/(L_S-1)) + 1; 0 -> 0; identity
    when L_S = L_T."""
    if layer == 0 or L_s == L_t:
        return layer
    if L_s == 1:
        return L_t
    return math.floor((layer - 1) * (L_t - 1) / (L_s - 1) + 0.5) + 1


@dataclass
class Plan:
    """What an update computes, fixed once from the config and the two models."""
    method: str
    out_kind: str | None          # output-space loss: opd | opd_topk | opd_full | opd_chunk | None
    s_layers: list                # student layers aligned by OPRD (empty without OPRD)
    t_layers: list                # phi(l) for each
    # what each forward computes: OPRD layers, plus the final norm for logits
    s_taps: list
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
    # opd, opd_chunk on rollouts of older weights: each sampled token (chunk) weighs
    # min(p_student / p_sampler, importance_cap); 0: no weight (on-policy rollouts)
    importance_cap: float = 0.0


def make_plan(method, stu_cfg, tea_cfg, layers='all', positions='last_k', k_positions=2000,
              align='predict', distance='mse', oprd_coef=1.0, mu=1.0, topk=16, chunk=1024,
              importance_cap=0.0):
    out_kinds = {'opd': 'opd', 'opd_topk': 'opd_topk', 'opd_full': 'opd_full', 'opd+oprd': 'opd',
                 'opd_topk+oprd': 'opd_topk'}
    out_kind = out_kinds.get(method, 'opd_chunk' if method.startswith('opd_chunk') else None)
    L_s = stu_cfg.num_hidden_layers
    L_t = tea_cfg.num_hidden_layers if tea_cfg is not None else 0
    s_layers = parse_layers(layers, L_s) if 'oprd' in method or method == 'bridge_fit' else []
    t_layers = [depth_map(l, L_s, L_t) for l in s_layers]
    # the student's final norm is always tapped
    # (logits for output losses, sft and the sampler check)
    s_taps = sorted(set(s_layers) | ({L_s} if method != 'bridge_fit' else set()))
    t_taps = sorted(set(t_layers) | ({L_t} if out_kind else set()))
    vocab = (min(stu_cfg.vocab_size, tea_cfg.vocab_size) if tea_cfg is not None
             else stu_cfg.vocab_size)
    # only the sampled-token losses weigh a token by its probability; the others need no weight
    if out_kind not in ('opd', 'opd_chunk'):
        importance_cap = 0.0
    return Plan(method, out_kind, s_layers, t_layers, s_taps, t_taps, L_s, L_t, vocab, positions,
                k_positions, align, distance, oprd_coef * (mu if out_kind else 1.0), topk, chunk,
                importance_cap)


# --------------------------------------------------------- losses (sums; divided by a global count)

def oprd_loss(h_s, h_t, distance='mse', proj=None, t_proj=None):
    """Sum over rows of (1/d) ||h_S - sg(h_T)||^2, rows = supervised positions (N, d).
    Also the sum of cosines.

    With a projector, h_S is mapped to the teacher's width first; d is the width compared. Through a
    bridge, proj = P_S and t_proj = P_T(. - mu_T) map both sides to the bridge's r dimensions.
    """
    h_t = h_t.detach().float()
    if t_proj is not None:
        h_t = t_proj(h_t)
    h_s = h_s.float() if proj is None else proj(h_s.float())
    cos = F.cosine_similarity(h_s.detach(), h_t, dim=-1).sum()
    if distance == 'normalized_mse':  # else raw MSE / d
        h_s, h_t = F.normalize(h_s, dim=-1), F.normalize(h_t, dim=-1)
    return (h_s - h_t).pow(2).sum() / h_s.shape[-1], cos


def importance_weight(logp_student, logp_sampler, cap):
    """Truncated importance sampling (verl, AReaL): min(p_student / p_sampler, cap) of each
    sampled token or chunk, from log-probs, without gradient."""
    return (logp_student.detach() - logp_sampler).exp().clamp(max=cap)


def output_loss_chunk(kind, h_s, h_t, targets, w_s, w_t, vocab, k, logp_sampler=None, cap=0.0):
    """One chunk of output-space OPD: rows (n, d) of final-norm states,
    targets (n,) the sampled tokens.

    Returns (loss sum, KL-estimate sum, log p_S of each target (n,) without gradient: the sampler
    check and the importance weights' log read them). Log-probs are over the common vocabulary
    prefix, in fp32. opd with cap > 0: each token's term weighs importance_weight(log p_S,
    logp_sampler (n,), cap).
    """
    logp_s = F.log_softmax(F.linear(h_s, w_s)[:, :vocab].float(), dim=-1)
    with torch.no_grad():
        logp_t = F.log_softmax(F.linear(h_t, w_t)[:, :vocab].float(), dim=-1)
    target_lp = logp_s.gather(1, targets[:, None])[:, 0]
    target_logp = target_lp.detach()
    if kind == 'opd':  # sampled token: REINFORCE with per-token advantage -sg(u_t)
        u = (target_lp - logp_t.gather(1, targets[:, None])[:, 0]).detach()
        if cap:
            weight = importance_weight(target_lp, logp_sampler, cap)
            return (weight * u * target_lp).sum(), u.sum(), target_logp
        return (u * target_lp).sum(), u.sum(), target_logp
    if kind == 'opd_topk':  # the student's top-k, probabilities renormalised on it
        top_lp, top_i = logp_s.detach().topk(k, dim=-1)
        p_bar = top_lp.softmax(-1)
        lp = logp_s.gather(1, top_i)
        diff = (lp - logp_t.gather(1, top_i)).detach()
        return (p_bar * diff * lp).sum(), (p_bar * diff).sum(), target_logp
    if kind == 'opd_full':  # exact reverse KL(p || q) over the vocabulary
        kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
        return kl.sum(), kl.detach().sum(), target_logp
    raise DistillError(f"unknown output loss {kind!r}")


def log_softmax_(z):
    """F.log_softmax over the last dim, bit for bit, written over z where it can be: a contiguous
    CPU tensor. On a CPU the first touch of a fresh (rows, V) buffer's pages costs several times the
    pass itself; on a GPU the caching allocator has one ready."""
    if z.is_cpu and z.is_contiguous():
        return torch.log_softmax(z, -1, out=z)
    return F.log_softmax(z, dim=-1)


class FullKL(torch.autograd.Function):
    """opd_full's loss, sum over rows of KL(p_S || p_T), with its gradient made in the forward pass,
    chunk rows at a time: d KL / d z_S = p_S * (log p_S - log p_T - KL) for each row's student
    logits z_S. So backward only scales it, and no logits are recomputed (each chunk costs two head
    matmuls forward and two for the gradient, not six). Between the passes it holds a gradient of
    the head's size, as the head's own .grad will. Also returns log p_S of each row's target (no
    gradient): the sampler check reads them instead of a head of its own."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, vocab, chunk):
        grad_h = torch.empty_like(h_s)
        grad_w = torch.zeros_like(w_s)
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        target_logp = torch.empty(h_s.shape[0], dtype=torch.float32, device=h_s.device)
        for i in range(0, h_s.shape[0], chunk):
            sl = slice(i, i + chunk)
            logp_s = log_softmax_(F.linear(h_s[sl], w_s)[:, :vocab].float())
            target_logp[sl] = logp_s.gather(1, targets[sl, None])[:, 0]
            logp_t = log_softmax_(F.linear(h_t[sl], w_t)[:, :vocab].float())
            diff = torch.sub(logp_s, logp_t, out=logp_t)
            p = logp_s.exp_()  # in place: log p_S is not needed again
            # sum_v p (log p - log q), no (n, V) product
            kl = torch.bmm(p[:, None, :], diff[:, :, None])[:, 0, 0]
            total += kl.sum()
            g = diff.sub_(kl[:, None]).mul_(p).to(h_s.dtype)
            grad_h[sl] = g @ w_s[:vocab]
            grad_w[:vocab].addmm_(g.t(), h_s[sl])
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(target_logp)
        return total, target_logp

    @staticmethod
    def backward(ctx, grad_out, _):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None, None


def output_loss(kind, h_s, h_t, targets, w_s, w_t, vocab, k, chunk, logp_sampler=None, cap=0.0):
    """Output-space loss over all rows, chunk rows at a time; each chunk's logits are
    recomputed in backward (activation checkpointing), so no (rows, V) tensor of the whole
    batch ever exists. opd_full makes its exact gradient in the forward pass instead (FullKL).
    Returns (loss, KL-estimate sum, log p_S of each row's target without gradient)."""
    if kind == 'opd_full' and torch.is_grad_enabled():
        loss, target_logp = FullKL.apply(h_s, w_s, h_t.detach(), w_t.detach(),
                                         targets, vocab, chunk)
        return loss, loss.item(), target_logp
    loss = h_s.new_zeros((), dtype=torch.float32)
    kl = 0.0
    target_logp = []
    for i in range(0, h_s.shape[0], chunk):
        sl = slice(i, i + chunk)
        sampler_rows = logp_sampler[sl] if cap else None
        args = (kind, h_s[sl], h_t[sl], targets[sl], w_s, w_t, vocab, k, sampler_rows, cap)
        if torch.is_grad_enabled():
            l, e, lp = torch.utils.checkpoint.checkpoint(output_loss_chunk, *args,
                                                         use_reentrant=False)
        else:
            l, e, lp = output_loss_chunk(*args)
        loss = loss + l
        kl = kl + e.item()
        target_logp.append(lp)
    if not target_logp:
        return loss, kl, h_s.new_zeros(0, dtype=torch.float32)
    return loss, kl, torch.cat(target_logp)


def _token_logprobs_chunk(h, w, targets, vocab):
    logp = F.log_softmax(F.linear(h, w)[:, :vocab].float(), dim=-1)
    return logp.gather(1, targets[:, None])[:, 0]


def token_logprobs(h, w, targets, vocab, chunk):
    """log p(target) of each row (n, d) under the head w, over the first vocab entries, chunk rows
    at a time (as output_loss: recomputed in backward, no (rows, V) tensor of the whole batch)."""
    out = []
    for i in range(0, h.shape[0], chunk):
        args = (h[i:i + chunk], w, targets[i:i + chunk], vocab)
        if torch.is_grad_enabled():
            out.append(torch.utils.checkpoint.checkpoint(_token_logprobs_chunk, *args,
                                                         use_reentrant=False))
        else:
            out.append(_token_logprobs_chunk(*args))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


def chunk_opd_loss(lp_s, lp_t, s_spans, t_spans, lp_sampler=None, cap=0.0):
    """Chunk-level sampled-token OPD (METHOD.md §4b): per chunk c, l_S(c) and l_T(c) sum each
    model's log-probs of its own tokens in c (lp_s, lp_t: 1-D over each side's response tokens;
    spans (C, 2) [start, end) into them, align.align_chunks' output offset and concatenated over the
    micro-batch's rollouts). Returns (sum_c sg(l_S - l_T) * l_S, sum_c (l_S - l_T)); the step
    divides both by its global chunk count. One-token chunks make it sampled-token OPD exactly.
    cap > 0: each chunk's term weighs importance_weight(l_S(c), the sampler's sum over c of
    lp_sampler (its log-probs of the student's tokens), cap)."""
    l_s = chunk_sums(lp_s, s_spans)
    l_t = chunk_sums(lp_t.detach(), t_spans)
    u = (l_s - l_t).detach()
    if cap:
        weight = importance_weight(l_s, chunk_sums(lp_sampler, s_spans), cap)
        return (weight * u * l_s).sum(), u.sum().item()
    return (u * l_s).sum(), u.sum().item()


def chunk_sums(x, spans):
    """Sum of x (1-D) over each [start, end) span: one index_add, differentiable, exact
    for one-token spans."""
    spans = torch.as_tensor(spans, dtype=torch.long).reshape(-1, 2)
    lengths = spans[:, 1] - spans[:, 0]
    chunk = torch.repeat_interleave(torch.arange(len(spans)), lengths)
    # position of each covered token: its span's start plus its rank within the span
    pos = torch.arange(len(chunk)) - (lengths.cumsum(0) - lengths)[chunk] + spans[chunk, 0]
    return x.new_zeros(len(spans)).index_add(0, chunk.to(x.device), x[pos.to(x.device)])


def sft_loss(logits, targets):
    """Summed cross-entropy of the reference tokens; logits (n, V) at the predicting positions."""
    return F.cross_entropy(logits.float(), targets, reduction='sum')


# ----------------------------------------------------------------------------- one micro-batch

@dataclass
class Maps:
    """What turns states into what the losses compare: the LM heads' weights (output-space
    losses and sft) and, across widths, the learned projector or the frozen OPRD-Bridge (each
    None when unused)."""
    student_head: torch.Tensor | None = None
    teacher_head: torch.Tensor | None = None
    projector: torch.nn.ModuleDict | None = None
    bridge: torch.nn.Module | None = None


@dataclass
class LossStats:
    """Sums over one micro-batch, for the step's log."""
    kl: float = 0.0
    layer_loss: list = field(default_factory=list)    # OPRD's loss sum of each aligned layer
    layer_cos: list = field(default_factory=list)     # and its sum of cosines
    # output-space losses: the student's log-probability of each supervised token (the sampler
    # check reads them)
    target_logp: torch.Tensor | None = None
    # opd and opd_chunk one step behind: the importance weights of their terms (tokens, chunks),
    # their sum, how many, and how many the cap truncated
    weight_sum: float = 0.0
    weight_count: int = 0
    weight_capped: int = 0


def oprd_term(plan, batch, student_taps, teacher_rows, maps):
    """OPRD's sum over the supervised states, averaged over the aligned layers; and each layer's
    loss and cosine sums. The i-th teacher row marked oprd_mask among the kept ones pairs with the
    i-th student row."""
    teacher_side = batch.for_teacher
    teacher_of_kept = teacher_side.oprd_mask[teacher_side.keep]
    total = 0.0
    layer_loss = []
    layer_cos = []
    for ls, lt in zip(plan.s_layers, plan.t_layers):
        # through the frozen bridge (both sides mapped), the learned projector, or as they are
        key = str(ls)
        student_map = maps.projector[key] if maps.projector is not None else None
        teacher_map = None
        if maps.bridge is not None:
            student_map = maps.bridge.student[key]
            teacher_map = maps.bridge.teacher[key]
        l_sum, cos = oprd_loss(student_taps[ls][batch.oprd_mask], teacher_rows[lt][teacher_of_kept],
                               plan.distance, student_map, teacher_map)
        total = total + l_sum / len(plan.s_layers)
        layer_loss.append(l_sum.item())
        layer_cos.append(cos.item())
    return total, layer_loss, layer_cos


def chunk_term(plan, batch, student_taps, teacher_rows, maps):
    """opd_chunk: each model scores its own tokens, summed over the chunks both
    have read (chunk_opd_loss). Returns (loss sum, its KL-estimate sum, the student's log-prob
    of each of its response tokens, without gradient)."""
    teacher_side = batch.for_teacher
    # another tokenizer: each model over its whole head
    vocab = plan.vocab if batch.teacher is None else None
    student_states = student_taps[plan.L_s][batch.out_mask]
    lp_s = token_logprobs(student_states, maps.student_head, batch.targets, vocab, plan.chunk)
    with torch.no_grad():
        teacher_states = teacher_rows[plan.L_t][teacher_side.out_mask[teacher_side.keep]]
        lp_t = token_logprobs(teacher_states, maps.teacher_head, teacher_side.targets, vocab,
                              plan.chunk)
    lp_sampler = batch.logp_next[batch.out_mask] if plan.importance_cap else None
    loss, kl = chunk_opd_loss(lp_s, lp_t, *batch.chunk_spans, lp_sampler, plan.importance_cap)
    return loss, kl, lp_s.detach()


def output_term(plan, batch, student_taps, teacher_rows, maps):
    """The output-space loss (or sft's cross-entropy) summed over the positions that predict a
    response token. Returns (loss sum, KL-estimate sum, the student's log-prob of the token each
    of those positions predicts, without gradient; None under sft)."""
    if plan.out_kind == 'opd_chunk':
        return chunk_term(plan, batch, student_taps, teacher_rows, maps)
    rows_s = student_taps[plan.L_s][batch.out_mask]
    if plan.method == 'sft':
        logits = F.linear(rows_s, maps.student_head)[:, :plan.vocab]
        return sft_loss(logits, batch.targets), 0.0, None
    rows_t = teacher_rows[plan.L_t][batch.out_mask[batch.keep]]
    lp_sampler = batch.logp_next[batch.out_mask] if plan.importance_cap else None
    return output_loss(plan.out_kind, rows_s, rows_t, batch.targets, maps.student_head,
                       maps.teacher_head, plan.vocab, plan.topk, plan.chunk, lp_sampler,
                       plan.importance_cap)


def micro_batch_loss(plan, batch, student_taps, teacher_rows, counts, maps):
    """The loss of one micro-batch, already divided by the step's global supervised counts
    (batch.StepCounts), so that summing it over micro-batches and ranks gives the step's mean.
    student_taps: the student's taps {layer: (B, T, d)}; teacher_rows: the teacher's taps at the
    positions its batch marks keep only {layer: (N, d)} (distill.py keeps no other teacher rows).
    Returns (loss, LossStats)."""
    loss = student_taps[plan.s_taps[-1]].new_zeros((), dtype=torch.float32)
    stats = LossStats()
    if plan.out_kind or plan.method == 'sft':
        out, stats.kl, stats.target_logp = output_term(
            plan, batch, student_taps, teacher_rows, maps)
        loss = loss + out / max(counts.outputs, 1)
    if plan.s_layers:
        oprd, stats.layer_loss, stats.layer_cos = oprd_term(
            plan, batch, student_taps, teacher_rows, maps)
        loss = loss + plan.oprd_weight * oprd / max(counts.states, 1)
    if plan.importance_cap:
        stats.weight_sum, stats.weight_count, stats.weight_capped = importance_figures(
            plan, batch, stats.target_logp)
    return loss, stats


def importance_figures(plan, batch, target_logp):
    """The importance weights that opd's tokens (opd_chunk's chunks) carry in the loss, for the
    step's log: their sum, how many, and how many min(., importance_cap) truncated. target_logp:
    the student's log-prob of each supervised token (output_term's)."""
    lp_student = target_logp
    lp_sampler = batch.logp_next[batch.out_mask]
    if plan.out_kind == 'opd_chunk':
        s_spans = batch.chunk_spans[0]
        lp_student = chunk_sums(lp_student, s_spans)
        lp_sampler = chunk_sums(lp_sampler, s_spans)
    weights = importance_weight(lp_student, lp_sampler, plan.importance_cap)
    capped = int((weights >= plan.importance_cap).sum())
    return weights.sum().item(), weights.numel(), capped
