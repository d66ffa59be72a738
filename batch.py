"""
What one update reads (distill.py): the rollouts, and the micro-batches made of them with what each
supervises.

    # view: the teacher's, across tokenizers
    rollout = Rollout(prompt_ids, response_ids, finish, logprobs, messages)
    # one tokenizer
    batch = supervise(collate([rollout, ...], pad_id, device), plan)
    # any two
    batch = micro_batch([rollout, ...], plan, Tokenizers(student, teacher), device)
    # across tokenizers: the rollouts the teacher can read, and the step's Alignment
    # the ranks that train: their process group (distill.py's roles.train_group)
    rollouts, alignment = aligned_rollouts(rollouts, group)
    batches, counts, n_micro = micro_batches(rollouts, plan, tokenizers, device, size,
                                             check_tokens, check_seed, group)

Every (B, T) mask is over the right-padded ids. Across tokenizers batch.teacher is the teacher's own
batch of the same rollouts (align.py), and the OPRD mask and the chunks are those both models have
read.
"""
from dataclasses import dataclass

import numpy as np
import torch

import align
from fsdp import all_reduce_max, all_reduce_sum


class DistillError(ValueError):
    """A setting or input that cannot work; raised before any work is done."""


def ceil_div(a, b):
    """a / b rounded up, in integers."""
    return -(-a // b)


@dataclass
class Tokenizers:
    """The student's tokenizer, and the teacher's when it tokenizes differently (else None)."""
    student: object
    teacher: object = None


@dataclass
class Rollout:
    """One sequence to train on: a student rollout, or a reference solution under sft."""
    prompt: list                  # prompt ids, through the student's chat template
    response: list                # response ids (the stop token included when it stopped)
    finish: str                   # 'stop' | 'length'
    logprobs: list | None = None  # the sampler's log-probability of each response token
    messages: list | None = None  # the conversation the prompt was rendered from
    view: align.TeacherView | None = None  # the teacher's reading, when its tokenizer differs


@dataclass
class Batch:
    """One micro-batch, (B, T) each: the ids and masks of collate, then what supervise marks on
    it."""
    ids: torch.Tensor             # long, right-padded
    attention_mask: torch.Tensor  # bool: real tokens
    response_mask: torch.Tensor   # bool: response tokens
    out_mask: torch.Tensor        # bool: the positions that predict a response token
    # the sampler's log-probability of the token each position predicts, or NaN
    logp_next: torch.Tensor
    oprd_mask: torch.Tensor | None = None  # the states OPRD aligns
    keep: torch.Tensor | None = None       # every position whose teacher state a loss reads
    check: torch.Tensor | None = None      # the positions whose sampled token the student re-scores
    # opd_chunk: (student, teacher) (C, 2) [start, end) token spans
    chunk_spans: tuple | None = None
    teacher: 'Batch | None' = None         # the teacher's own batch, when its tokenizer differs

    @property
    def for_teacher(self):
        """The batch the teacher reads: its own across tokenizers, else this one."""
        return self.teacher if self.teacher is not None else self

    @property
    def targets(self):
        """The token each out_mask position predicts, in row-major order."""
        return next_tokens(self.ids, self.out_mask)


def next_tokens(ids, mask):
    """The token after each position of mask (B, T): ids (B, T) shifted by one, read where mask is
    set."""
    return ids[:, 1:][mask[:, :-1]]


# ----------------------------------------------------------------------------- one micro-batch

def response_masks(resp_mask, positions, k, align):
    """resp_mask (B, T) bool: response tokens. Returns the positions whose states are supervised.

    positions selects response tokens (all, the first k, the last k of each row, EOS included);
    align picks the position that carries token t: 'predict' = t-1 (the state that predicts t, as
    output-space OPD), 'token' = t itself.
    """
    # index of each response token within its row, and each row's response length
    idx = resp_mask.long().cumsum(-1) - 1
    n = resp_mask.long().sum(-1, keepdim=True)
    keep = resp_mask
    if positions == 'first_k':
        keep = resp_mask & (idx < k)
    elif positions == 'last_k':
        keep = resp_mask & (idx >= n - k)
    if align == 'predict':
        keep = torch.cat([keep[:, 1:], torch.zeros_like(keep[:, :1])], dim=1)
    return keep


def collate(rollouts, pad_id, device):
    """Right-padded (B, T) ids and masks of rollouts (Rollout each). Returns a Batch with nothing
    supervised."""
    T = max(len(r.prompt) + len(r.response) for r in rollouts)
    B = len(rollouts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.bool)
    response_mask = torch.zeros(B, T, dtype=torch.bool)
    logp_next = torch.full((B, T), float('nan'))
    for i, r in enumerate(rollouts):
        P = len(r.prompt)
        end = P + len(r.response)
        ids[i, :end] = torch.tensor(list(r.prompt) + list(r.response), dtype=torch.long)
        attention_mask[i, :end] = True
        response_mask[i, P:end] = True
        if r.logprobs is not None:
            logp_next[i, P - 1:end - 1] = torch.tensor(r.logprobs, dtype=torch.float32)
    out_mask = torch.cat([response_mask[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], dim=1)
    return Batch(ids.to(device), attention_mask.to(device), response_mask.to(device),
                 out_mask.to(device), logp_next.to(device))


def supervise(batch, plan, check_gen=None, n_check=0):
    """Marks on batch what the step supervises: oprd_mask, the positions OPRD aligns; keep, every
    position whose teacher state a loss reads (the only teacher rows kept); check, up to n_check
    random positions whose sampled token the student re-scores (the sampler check); under opd_chunk
    chunk_spans, its chunks on each side: with one tokenizer each response token is one
    (teacher_batch replaces them across tokenizers). Returns batch."""
    nothing = torch.zeros_like(batch.response_mask)
    batch.oprd_mask = nothing
    if plan.s_layers:
        batch.oprd_mask = response_masks(batch.response_mask, plan.positions, plan.k_positions,
                                         plan.align)
    batch.keep = batch.oprd_mask | (batch.out_mask if plan.out_kind else nothing)
    candidates = (batch.out_mask & ~batch.logp_next.isnan()).flatten().nonzero()[:, 0]
    picked = candidates[:0]
    if check_gen is not None:
        order = torch.randperm(len(candidates), generator=check_gen)[:n_check]
        picked = candidates[order.to(candidates.device)]
    batch.check = torch.zeros_like(batch.response_mask).flatten().index_fill_(0, picked, True)
    batch.check = batch.check.view_as(batch.response_mask)
    if plan.out_kind == 'opd_chunk':
        n = int(batch.out_mask.sum())
        one_token_chunks = torch.stack([torch.arange(n), torch.arange(1, n + 1)], 1)
        batch.chunk_spans = (one_token_chunks, one_token_chunks)
    return batch


def chosen_chunks(positions, k):
    """The chunks OPRD compares of one rollout: all, the first k or the last k."""
    if positions == 'first_k':
        return slice(None, k)
    if positions == 'last_k':
        return slice(-k, None)
    return slice(None)


def teacher_batch(rollouts, teacher_tok, plan, device):
    """One micro-batch as the teacher reads it; each rollout carries its view (align.rollout_view).
    Returns the teacher's Batch with oprd_mask = the states OPRD compares and keep = every row a
    loss reads (those, plus the positions predicting its response tokens under opd_chunk); the
    student's (B, T) mask of the states OPRD compares, in the same row-major order, so the i-th
    teacher OPRD row pairs with the i-th student row; and the chunks (s_spans, t_spans) (C, 2),
    offset into each side's response tokens in row-major order (the rows of the out_mask positions).
    plan.positions picks chunks for OPRD (all, the first or the last plan.k_positions); chunk-level
    OPD reads them all."""
    views = [r.view for r in rollouts]
    teacher_rollouts = [Rollout(v.prompt_ids, v.response_ids, r.finish)
                        for v, r in zip(views, rollouts)]
    teacher = collate(teacher_rollouts, teacher_tok.pad_id, device)
    T = max(len(r.prompt) + len(r.response) for r in rollouts)
    s_mask = torch.zeros(len(rollouts), T, dtype=torch.bool)
    t_mask = torch.zeros(teacher.ids.shape, dtype=torch.bool)
    s_spans = []
    t_spans = []
    s_at = 0
    t_at = 0
    chosen = chosen_chunks(plan.positions, plan.k_positions)
    for i, (v, r) in enumerate(zip(views, rollouts)):
        s_pos, t_pos = align.state_positions(v, len(r.prompt), len(v.prompt_ids), plan.align)
        s_mask[i, torch.as_tensor(s_pos[chosen])] = True
        t_mask[i, torch.as_tensor(t_pos[chosen])] = True
        s_spans.append(v.s_spans + s_at)
        t_spans.append(v.t_spans + t_at)
        s_at += len(r.response)
        t_at += len(v.response_ids)
    # chunk-level OPD alone: no state is compared
    if not plan.s_layers:
        s_mask = torch.zeros_like(s_mask)
        t_mask = torch.zeros_like(t_mask)
    teacher.oprd_mask = t_mask.to(device)
    teacher.keep = teacher.oprd_mask | (teacher.out_mask if plan.out_kind == 'opd_chunk' else False)
    return teacher, s_mask.to(device), (np.concatenate(s_spans), np.concatenate(t_spans))


def micro_batch(rollouts, plan, tokenizers, device, check_gen=None, n_check=0):
    """One micro-batch with what it supervises (supervise); across tokenizers also the teacher's own
    reading of it (batch.teacher), OPRD's states and opd_chunk's spans at the chunks of text both
    have read."""
    batch = supervise(collate(rollouts, tokenizers.student.pad_id, device), plan, check_gen,
                      n_check)
    if tokenizers.teacher is not None:
        batch.teacher, batch.oprd_mask, batch.chunk_spans = teacher_batch(
            rollouts, tokenizers.teacher, plan, device)
    return batch


def filler_batch(item, plan, tokenizers, device, whitespace_only=False, enable_thinking=False):
    """A one-rollout micro-batch (item: a training prompt) that a rank with fewer micro-batches than
    the busiest runs at weight zero: FSDP2's collectives pair up only if every rank runs as many."""
    rollout = Rollout(item['prompt'], tokenizers.student.encode(' 1'), 'length', None,
                      item['messages'])
    if tokenizers.teacher is not None:
        rollout.view = align.rollout_view(rollout.messages, rollout.response, rollout.finish,
                                          tokenizers.student, tokenizers.teacher, whitespace_only,
                                          enable_thinking)
    return micro_batch([rollout], plan, tokenizers, device)


# ------------------------------------------------------------------------- the step's micro-batches

@dataclass
class StepCounts:
    """The step's supervised counts summed over ranks: every loss is divided by them, so sharding
    changes nothing."""
    outputs: float    # output-space positions, or chunks under opd_chunk
    states: float     # OPRD positions


def micro_batches(rollouts, plan, tokenizers, device, size, check_tokens, check_seed, group):
    """This rank's micro-batches of at most size rollouts, the step's StepCounts over group's ranks
    (the trainers), and how many micro-batches the busiest rank has (every rank runs as many).
    check_tokens sampled tokens are re-scored, spread over the micro-batches, drawn with a generator
    seeded by check_seed."""
    gen = torch.Generator().manual_seed(check_seed)
    n_batches = ceil_div(len(rollouts), size)
    n_check = ceil_div(check_tokens, max(1, n_batches))
    batches = [micro_batch(rollouts[i:i + size], plan, tokenizers, device, gen, n_check)
               for i in range(0, len(rollouts), size)]
    if plan.out_kind == 'opd_chunk':
        outputs = sum(len(b.chunk_spans[0]) for b in batches)
    else:
        outputs = sum(b.out_mask.sum().item() for b in batches)
    states = sum(b.oprd_mask.sum().item() for b in batches)
    counts = StepCounts(all_reduce_sum(outputs, group).item(),
                        all_reduce_sum(states, group).item())
    return batches, counts, int(all_reduce_max(len(batches), group))


# ------------------------------------------------------------------- what the teacher could read

@dataclass
class Alignment:
    """How much of a step's rollouts the teacher could read, summed over ranks (across
    tokenizers)."""
    rollouts: int
    unaligned: int        # rollouts without one chunk both models read: left out of the step
    compared_bytes: int   # response bytes inside the chunks compared
    response_bytes: int

    @property
    def unaligned_share(self):
        return self.unaligned / max(self.rollouts, 1)

    @property
    def byte_share(self):
        return self.compared_bytes / max(self.response_bytes, 1)


def aligned_rollouts(rollouts, group):
    """The rollouts whose view (align.TeacherView) compares at least one chunk, and the step's
    Alignment over group's ranks (a collective: every rank of it calls it). The others are left out
    of the step; a rank left with fewer micro-batches runs zero-weight fillers, as always."""
    kept, counts = keep_aligned(rollouts)
    return kept, Alignment(*[int(x) for x in all_reduce_sum(counts, group).tolist()])


def keep_aligned(rollouts):
    """aligned_rollouts on one rank: the rollouts kept, and the Alignment's counts of these."""
    views = [r.view for r in rollouts]
    kept = [r for r in rollouts if r.view.aligned]
    counts = [len(rollouts), len(rollouts) - len(kept), sum(v.compared_bytes for v in views),
              sum(v.response_bytes for v in views)]
    return kept, counts
