"""
A step's rollouts and who holds them (distill.py): which prompts a rank samples and with which seed
(step_prompts, rollouts: with sampler ranks, sampler j draws what rank j of a colocated run of k
ranks draws), each trainer's share dealt by length (dealt), and the rollouts sampled one step
ahead, which checkpoints carry (rollouts_to_save, saved_rollouts).

    settings = RolloutSettings(...)               # distill.py's rollout_settings(plan)
    seqs = rollouts(sampler, items, step, rank, world, tokenizers, settings)
    mine, load, alignment = dealt(seqs, roles, tokenizers)
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

import align as align_tokens
from batch import Alignment, Rollout, aligned_rollouts, keep_aligned
from fsdp import balance, deal_pool
from ranks import receive_rollouts


@dataclass
class RolloutSettings:
    """What rollouts() reads of the config, fixed once (rollout_settings)."""
    prompts_per_step: int
    n_samples: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int
    logprobs: bool                # the sampler returns its log-probs (for the sampler check)
    tensor_parallel_size: int     # 1 under sft: no sampler, every rank its own share
    reference: bool               # sft: the reference solutions instead of samples
    align_whitespace: bool
    enable_thinking: bool


def step_prompts(items, step, rank, world, settings):
    """This rank's prompts of a step: a seeded permutation per epoch, the step's slice, every
    world-th item. Shares may differ by one (or be empty): the micro-batch loop pads them."""
    per_step = settings.prompts_per_step
    per_epoch = max(1, len(items) // per_step)
    epoch, pos = divmod(step, per_epoch)
    epoch_order = torch.Generator().manual_seed(settings.seed + epoch)
    order = torch.randperm(len(items), generator=epoch_order).tolist()
    return [items[i] for i in order[pos * per_step:(pos + 1) * per_step]][rank::world]


def rollouts(sampler, items, step, rank, world, tokenizers, settings):
    """This rank's Rollouts of a step. The ranks of one tensor-parallel group share prompts and seed
    (vLLM's external launcher serves them together), then each keeps every tp-th sequence, so each
    rollout is trained on once. Across tokenizers each rollout's alignment runs on a thread from
    when the sampler hands it over, beside the sampling (align.Aligner)."""
    tp = settings.tensor_parallel_size
    group = rank // tp
    mine = step_prompts(items, step, group, world // tp, settings)
    if settings.reference:
        return [Rollout(it['prompt'], it['response'], 'stop', None, it['messages']) for it in mine]

    def kept_here(i, j):
        return (i * settings.n_samples + j) % tp == rank % tp

    aligner = None
    if tokenizers.teacher is not None:
        aligner = align_tokens.Aligner([it['messages'] for it in mine], tokenizers.student,
                                       tokenizers.teacher, settings.align_whitespace,
                                       settings.enable_thinking, kept_here)
    samples = []
    if mine:
        samples = sampler.generate([it['prompt'] for it in mine], n=settings.n_samples,
                                   temperature=settings.temperature, top_p=settings.top_p,
                                   top_k=settings.top_k, max_new_tokens=settings.max_new_tokens,
                                   stop_ids=tokenizers.student.eos_ids,
                                   seed=settings.seed * 1_000_003 + step * (world // tp) + group,
                                   logprobs=settings.logprobs, on_sample=aligner)
    # the rollouts are in: the engine sleeps (weights offloaded, KV cache freed) through the
    # training step, until update_weights wakes it (no-ops without sleep mode: CPU, bridge_fit)
    sampler.sleep()
    every = [(i, j, it, s) for i, (it, ss) in enumerate(zip(mine, samples))
             for j, s in enumerate(ss)]
    out = []
    for i, j, it, s in every[rank % tp::tp]:
        view = aligner.view(i, j) if aligner is not None else None
        out.append(Rollout(it['prompt'], s.tokens, s.finish, s.logprobs, it['messages'], view))
    return out


def rollouts_to_save(ahead, roles):
    """The rollouts sampled ahead, as plain lists for resume.pt (no view: a resume aligns them
    again): [rank][i] -> dict, each rank's gathered over the trainers; with sampler ranks one list,
    the pool every trainer holds."""
    mine = [dict(prompt=r.prompt, response=r.response, finish=r.finish, logprobs=r.logprobs,
                 messages=r.messages) for r in ahead]
    if roles.n_samplers:
        return [mine]
    every = [None] * roles.n_trainers
    dist.all_gather_object(every, mine, group=roles.train_group)
    return every


def saved_rollouts(state, index, tokenizers, settings):
    """This rank's rollouts sampled ahead (the pool, with sampler ranks: index 0), from a checkpoint
    (rollouts_to_save), aligned again across tokenizers."""
    seqs = [Rollout(**d) for d in state['ahead'][index]]
    if tokenizers.teacher is not None:
        for r in seqs:
            r.view = align_tokens.rollout_view(r.messages, r.response, r.finish,
                                               tokenizers.student, tokenizers.teacher,
                                               settings.align_whitespace,
                                               settings.enable_thinking)
    return seqs


def received(roles):
    """With sampler ranks: a step's pool of rollouts (every sampler's, in sampler order) and their
    Deliveries."""
    deliveries = receive_rollouts(roles)
    return [r for d in deliveries for r in d.rollouts], deliveries


def dealt(seqs, roles, tokenizers):
    """This rank's share of the step's rollouts, dealt by length over the trainers, the max/mean
    load, and across tokenizers the step's Alignment (the rollouts the teacher cannot read at all
    are left out first; else None). seqs: this rank's own, or with sampler ranks the pool every
    trainer holds, so the share is dealt with no collective."""
    group = roles.train_group
    alignment = None
    if roles.n_samplers:
        if tokenizers.teacher is not None:
            seqs, counts = keep_aligned(seqs)
            alignment = Alignment(*counts)
        seqs, load = deal_pool(seqs, roles.n_trainers, dist.get_rank(group))
        return seqs, load, alignment
    if tokenizers.teacher is not None:
        seqs, alignment = aligned_rollouts(seqs, group)
    seqs, load = balance(seqs, group)
    return seqs, load, alignment
