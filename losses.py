"""
The objectives (METHOD.md §2-3): which layers and positions OPRD aligns, the OPRD loss on hidden states, and the
output-space OPD losses (sampled-token, top-k, full-vocabulary KL), computed in chunks of positions so no
(tokens x vocabulary) tensor of a batch ever exists. Every loss is a sum over supervised positions; at the bottom,
micro_batch_loss composes them for one micro-batch (the Plan says which), divided by the step's global counts.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    keep = resp_mask  # positions == 'all'; the settings were checked where they are read (distill.check_settings)
    if positions == 'first_k':
        keep = resp_mask & (idx < k)
    elif positions == 'last_k':
        keep = resp_mask & (idx >= n - k)
    if align == 'predict':
        keep = torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], dim=1)
    return keep


def collate(seqs, pad_id, device):
    """Right-padded (B, T) ids + masks. resp marks response tokens; out_mask the positions that predict them;
    logp_next the sampler's log-probability of the token each position predicts (NaN where there is none).
    seqs: (prompt ids, response ids, finish[, sampler log-probs or None])."""
    T = max(len(s[0]) + len(s[1]) for s in seqs)
    B = len(seqs)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.bool)
    resp = torch.zeros(B, T, dtype=torch.bool)
    logp_next = torch.full((B, T), float('nan'))
    for i, (p, r, *rest) in enumerate(seqs):
        idx[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attn[i, :len(p) + len(r)] = True
        resp[i, len(p):len(p) + len(r)] = True
        if len(rest) > 1 and rest[1] is not None:
            logp_next[i, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(rest[1], dtype=torch.float32)
    out_mask = torch.cat([resp[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], dim=1)
    return {'idx': idx.to(device), 'attn': attn.to(device), 'resp': resp.to(device), 'out_mask': out_mask.to(device),
            'logp_next': logp_next.to(device)}


def supervise(b, plan, check_gen=None, n_check=0):
    """Marks on micro-batch b what the step supervises: 'oprd' the positions OPRD aligns, 'keep' every position
    whose teacher state a loss reads (the only teacher rows kept), 'check' up to n_check random positions
    whose sampled token the student re-scores (the sampler check), and under opd_chunk 'spans', its chunks on
    each side: with one tokenizer, each response token is one (align.teacher_batch replaces them across
    tokenizers). Returns b."""
    b['oprd'] = response_masks(b['resp'], plan.positions, plan.k_positions, plan.align) if plan.s_layers else \
        torch.zeros_like(b['resp'])
    b['keep'] = b['oprd'] | (b['out_mask'] if plan.out_kind else torch.zeros_like(b['resp']))
    candidates = (b['out_mask'] & ~b['logp_next'].isnan()).flatten().nonzero()[:, 0]
    picked = candidates[torch.randperm(len(candidates), generator=check_gen)[:n_check].to(candidates.device)] \
        if check_gen is not None else candidates[:0]
    b['check'] = torch.zeros_like(b['resp']).flatten().index_fill_(0, picked, True).view_as(b['resp'])
    if plan.out_kind == 'opd_chunk':
        n = int(b['out_mask'].sum())
        b['spans'] = (torch.stack([torch.arange(n), torch.arange(1, n + 1)], 1),) * 2
    return b


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
    if distance == 'normalized_mse':  # else raw MSE / d
        h_s, h_t = F.normalize(h_s, dim=-1), F.normalize(h_t, dim=-1)
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


def log_softmax_(z):
    """F.log_softmax over the last dim, bit for bit, written over z where it can be: a contiguous CPU tensor. On a
    CPU the first touch of a fresh (rows, V) buffer's pages costs several times the pass itself; on a GPU the caching
    allocator has one ready."""
    if z.is_cpu and z.is_contiguous():
        return torch.ops.aten._log_softmax.out(z, -1, False, out=z)
    return F.log_softmax(z, dim=-1)


class FullKL(torch.autograd.Function):
    """opd_full's loss, sum over rows of KL(p_S || p_T), with its gradient made in the forward pass, chunk rows at
    a time: d KL / d z_S = p_S * (log p_S - log p_T - KL) for each row's student logits z_S. So backward only
    scales it, and no logits are recomputed (each chunk costs two head matmuls forward and two for the gradient,
    not six). Between the passes it holds a gradient of the head's size, as the head's own .grad will. Also
    returns log p_S of each row's target (no gradient): the sampler check reads them instead of a head of its own."""

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
            kl = torch.bmm(p[:, None, :], diff[:, :, None])[:, 0, 0]  # sum_v p (log p - log q), no (n, V) product
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


def output_loss(kind, h_s, h_t, targets, w_s, w_t, vocab, k, chunk):
    """Output-space loss over all rows, chunk rows at a time; each chunk's logits are recomputed in backward
    (activation checkpointing), so no (rows, V) tensor of the whole batch ever exists. opd_full makes its exact
    gradient in the forward pass instead (FullKL). Returns (loss, KL-estimate sum, log p_S of each row's target or
    None: FullKL's, which the sampler check reuses)."""
    if kind == 'opd_full' and torch.is_grad_enabled():
        loss, target_logp = FullKL.apply(h_s, w_s, h_t.detach(), w_t.detach(), targets, vocab, chunk)
        return loss, loss.item(), target_logp
    loss, kl = h_s.new_zeros((), dtype=torch.float32), 0.0
    for i in range(0, h_s.shape[0], chunk):
        sl = slice(i, i + chunk)
        args = (kind, h_s[sl], h_t[sl], targets[sl], w_s, w_t, vocab, k)
        if torch.is_grad_enabled():
            l, e = torch.utils.checkpoint.checkpoint(output_loss_chunk, *args, use_reentrant=False)
        else:
            l, e = output_loss_chunk(*args)
        loss, kl = loss + l, kl + e.item()
    return loss, kl, None


def _token_logprobs_chunk(h, w, targets, vocab):
    return F.log_softmax(F.linear(h, w)[:, :vocab].float(), dim=-1).gather(1, targets[:, None])[:, 0]


def token_logprobs(h, w, targets, vocab, chunk):
    """log p(target) of each row (n, d) under the head w, over the first vocab entries, chunk rows at a time (as
    output_loss: recomputed in backward, no (rows, V) tensor of the whole batch)."""
    out = []
    for i in range(0, h.shape[0], chunk):
        args = (h[i:i + chunk], w, targets[i:i + chunk], vocab)
        out.append(torch.utils.checkpoint.checkpoint(_token_logprobs_chunk, *args, use_reentrant=False)
                   if torch.is_grad_enabled() else _token_logprobs_chunk(*args))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


def chunk_opd_loss(lp_s, lp_t, s_spans, t_spans):
    """Chunk-level sampled-token OPD (METHOD.md §4b): per chunk c, l_S(c) and l_T(c) sum each model's log-probs
    of its own tokens in c (lp_s, lp_t: 1-D over each side's response tokens; spans (C, 2) [start, end) into
    them, align.align_chunks' output offset and concatenated over the micro-batch's rollouts). Returns
    (sum_c sg(l_S - l_T) * l_S, sum_c (l_S - l_T)); the step divides both by its global chunk count. One-token
    chunks make it sampled-token OPD exactly."""
    l_s, l_t = chunk_sums(lp_s, s_spans), chunk_sums(lp_t.detach(), t_spans)
    u = (l_s - l_t).detach()
    return (u * l_s).sum(), u.sum().item()


def chunk_sums(x, spans):
    """Sum of x (1-D) over each [start, end) span: one index_add, differentiable, exact for one-token spans."""
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
class Plan:
    """What an update computes, fixed once from the config and the two models."""
    method: str
    out_kind: str | None          # output-space loss: opd | opd_topk | opd_full | opd_chunk | None
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
    out_kind = {'opd': 'opd', 'opd_topk': 'opd_topk', 'opd_full': 'opd_full', 'opd+oprd': 'opd',
                'opd_topk+oprd': 'opd_topk'}.get(method, 'opd_chunk' if method.startswith('opd_chunk') else None)
    L_s = stu_cfg.num_hidden_layers
    L_t = tea_cfg.num_hidden_layers if tea_cfg is not None else 0
    s_layers = parse_layers(layers, L_s) if 'oprd' in method or method == 'bridge_fit' else []
    t_layers = [depth_map(l, L_s, L_t) for l in s_layers]
    # the student's final norm is always tapped (logits for output losses, sft and the sampler check)
    s_taps = sorted(set(s_layers) | ({L_s} if method != 'bridge_fit' else set()))
    t_taps = sorted(set(t_layers) | ({L_t} if out_kind else set()))
    vocab = min(stu_cfg.vocab_size, tea_cfg.vocab_size) if tea_cfg is not None else stu_cfg.vocab_size
    return Plan(method, out_kind, s_layers, t_layers, s_taps, t_taps, L_s, L_t, vocab, positions, k_positions,
                align, distance, oprd_coef * (mu if out_kind else 1.0), topk, chunk)


def micro_batch_loss(plan, hs_s, rows_t, b, n_out, n_rep, w_s=None, w_t=None, proj=None, bridge=None):
    """The loss of one micro-batch, already divided by the global supervised counts n_out (output-space
    positions, or chunks under opd_chunk) and n_rep (OPRD positions), so that summing it over micro-batches and
    ranks gives the step's mean. hs_s: the student's taps {layer: (B, T, d)}; rows_t: the teacher's taps at the
    positions its batch marks 'keep' only {layer: (N, d)} (distill.py keeps no other teacher rows). b: a
    micro-batch (collate, with 'oprd' and 'keep' masks; under opd_chunk 'spans', the chunks); across tokenizers
    b['teacher'] is the teacher's batch (align.teacher_batch). w_s, w_t: the LM heads' weights (output-space
    losses and sft only); proj: the learned projector (or None); bridge: the frozen OPRD-Bridge (or None).
    Returns (loss, stats): stats holds sums over this micro-batch for the log, and under opd_full the student's
    log-probability of each supervised token (target_logp, for sampler_gap)."""
    loss = hs_s[plan.s_taps[-1]].new_zeros((), dtype=torch.float32)
    stats = {'kl': 0.0, 'layer_loss': [], 'layer_cos': [], 'target_logp': None}
    t_b = b.get('teacher', b)  # the teacher's own reading of the micro-batch when the tokenizers differ
    if plan.out_kind == 'opd_chunk':  # each model scores its own tokens; summed over the chunks both have read
        vocab = plan.vocab if t_b is b else None  # another tokenizer: each model its whole head
        own = lambda batch: batch['idx'][:, 1:][batch['out_mask'][:, :-1]]  # the tokens each side's rows predict
        lp_s = token_logprobs(hs_s[plan.L_s][b['out_mask']], w_s, own(b), vocab, plan.chunk)
        with torch.no_grad():
            lp_t = token_logprobs(rows_t[plan.L_t][t_b['out_mask'][t_b['keep']]], w_t, own(t_b), vocab, plan.chunk)
        out, stats['kl'] = chunk_opd_loss(lp_s, lp_t, *b['spans'])
        loss = loss + out / max(n_out, 1)
    elif plan.out_kind or plan.method == 'sft':
        predicts = b['out_mask']  # positions whose next token is a response token
        rows_s = hs_s[plan.L_s][predicts]
        targets = b['idx'][:, 1:][predicts[:, :-1]]  # the token each of those positions predicts
        if plan.method == 'sft':
            out = sft_loss(F.linear(rows_s, w_s)[:, :plan.vocab], targets)
        else:
            out, stats['kl'], stats['target_logp'] = output_loss(
                plan.out_kind, rows_s, rows_t[plan.L_t][predicts[b['keep']]], targets, w_s, w_t, plan.vocab, plan.topk,
                plan.chunk)
        loss = loss + out / max(n_out, 1)
    if plan.s_layers:
        supervised, of_kept = b['oprd'], t_b['oprd'][t_b['keep']]
        rep = 0.0
        for ls, lt in zip(plan.s_layers, plan.t_layers):
            key = str(ls)  # through the frozen bridge (both sides mapped), the learned projector, or as they are
            maps = (bridge.student[key], bridge.teacher[key]) if bridge is not None else (proj and proj[key], None)
            l_sum, cos = oprd_loss(hs_s[ls][supervised], rows_t[lt][of_kept], plan.distance, *maps)
            rep = rep + l_sum / len(plan.s_layers)
            stats['layer_loss'].append(l_sum.item())
            stats['layer_cos'].append(cos.item())
        loss = loss + plan.oprd_weight * rep / max(n_rep, 1)
    return loss, stats


def sampler_gap(h_final, w, b, target_logp=None):
    """Sum and count of |log p_student - log p_sampler| of the sampled tokens at the positions b['check'] (a
    few hundred per step): h_final the student's final-norm states (B, T, d), w its LM head, b['logp_next'] the
    sampler's raw log-probability of the token each position predicts. A gap far above its first step's level
    means the sampler no longer serves the trained weights. target_logp: the student's log-probability of the token
    at every b['out_mask'] position, when the loss computed them (opd_full): read there, not computed again."""
    rows = b['check']
    with torch.no_grad():
        if target_logp is not None:  # the check's positions are among the loss's (supervise picks them so)
            mine = target_logp[rows[b['out_mask']]]
        else:
            logits = F.linear(h_final[rows].float(), w.float())  # log p = logit - logsumexp: no (rows, V) log-softmax
            mine = logits.gather(1, b['idx'][:, 1:][rows[:, :-1]][:, None])[:, 0] - logits.logsumexp(-1)
        return (mine - b['logp_next'][rows]).abs().sum().item(), rows.sum().item()


def stale_sampler(step, gap, first_gap, factor):
    """After the first step rollouts come from synced weights: a sampler whose log-probs drift far from the
    student's missed the sync (TRL #5312). Returns the reason to stop, or None."""
    if first_gap is None or gap <= factor * max(first_gap, 0.01):
        return None
    return (f"step {step}: stale sampler weights: the sampler's log-probs of its own tokens differ from the "
            f"student's by {gap:.4f} nats on average ({first_gap:.4f} at the first step); the weight sync did not "
            "reach the engine")
