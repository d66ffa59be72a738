"""
Sampler ranks (distill.py's rollout_ranks=k): the last k ranks of the world only sample, the others
only train. Each sampler rank holds one engine with its device to itself (no sleep, no wake); the
trainers shard the student with FSDP2 over their own group, and hold the teacher and the optimizer.
What crosses between the two sides, and over which process group:

- the step's rollouts: sampler j broadcasts its share over {the trainers, sampler j}
  (send_rollouts, receive_rollouts). Sampler j draws what rank j of a colocated run with k ranks
  draws (its prompts, its seeds), so the step's rollouts do not depend on how many ranks train;
- the new weights, after each optimizer step: gathered by the trainers (each DTensor all-gathered
  over the trainers' mesh, cast to the engine's dtype first), broadcast in buckets by trainer 0
  over {trainer 0, the samplers} (sync_samplers; receive_header, received_tensors). A header goes
  first: stop, or which tensors follow;
- once, at start: every rank's start-up error or its offer (agree_to_start), over the world.

Every collective names its group; nothing here assumes that all ranks train. With off_policy_steps=1
a sampler draws step t+1's rollouts while the trainers train step t (serve: the order of sends and
receives on both sides, so that neither waits for what the other has not sent yet).

    roles = make_roles(rollout_ranks)       # every rank, once, right after the process group
    # a trainer
    pool = receive_rollouts(roles)          # the step's rollouts, every sampler's share
    sync_samplers(roles, stu, dtype, stop=False, device=dev)
    # a sampler: its whole run
    serve(roles, sampler, make_rollouts, schedule, dev)

Under NCCL the groups are NCCL groups and every tensor that crosses lives on a GPU; under gloo, on
the CPU. A sampler rank that dies shows up on the trainers as an error of the collective they wait
in: the run stops with one line that names that rank (PeerGone); a trainer that dies, the same
line on the samplers.
"""
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from batch import DistillError
from rollout import fsdp_named_tensors, synced_parameters

# weights cross in buckets of about this many bytes (a few tensors of a small model, one matrix of
# a large one)
BUCKET_BYTES = 256 * 2**20


class PeerGone(DistillError):
    """A collective across the two sides failed: the ranks on the other side stopped or died."""


@dataclass
class Roles:
    """Who does what in the world, and the process groups between the two sides. With no sampler
    ranks (n_samplers=0) every rank trains and samples: train_group is the world's, the others are
    unused."""
    rank: int                 # this process's, in the world
    world: int
    n_samplers: int           # k: the last k ranks only sample
    train_group: object       # the trainers' process group (the world's when k = 0)
    rollout_groups: list      # per sampler j: {the trainers, sampler j}, where its rollouts travel
    sync_group: object        # {trainer 0, the samplers}: weights and the header before them

    @property
    def n_trainers(self):
        return self.world - self.n_samplers

    @property
    def is_sampler(self):
        return self.rank >= self.n_trainers

    @property
    def sampler_index(self):
        """A sampler rank's place among the samplers: the colocated rank whose rollouts it draws."""
        return self.rank - self.n_trainers

    def sampler_rank(self, j):
        """The world rank of sampler j."""
        return self.n_trainers + j


def make_roles(n_samplers):
    """The roles and groups of this rank. Every rank calls it, once, in the same order (making a
    group is a collective over the world)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if not n_samplers:
        return Roles(rank, world, 0, dist.group.WORLD, [], None)
    trainers = list(range(world - n_samplers))
    samplers = list(range(world - n_samplers, world))
    train_group = dist.new_group(trainers)
    rollout_groups = [dist.new_group(trainers + [j]) for j in samplers]
    sync_group = dist.new_group([0] + samplers)
    return Roles(rank, world, n_samplers, train_group, rollout_groups, sync_group)


def agree_to_start(roles, error, offer):
    """Every rank's start-up, agreed over the world: each rank's error (None when it started) and
    what it offers the other side (trainer 0: the rollout settings; a sampler: its engine's dtype).
    Returns every rank's offer, by rank; raises the first error on every rank, so a run where one
    side cannot start stops everywhere before any work."""
    gathered = [None] * roles.world
    dist.all_gather_object(gathered, (error, offer), group=dist.group.WORLD)
    for r, (e, _) in enumerate(gathered):
        if e is not None:
            raise DistillError(e if r == roles.rank else f"rank {r} could not start: {e}")
    return [o for _, o in gathered]


def gone(who, e):
    """The one line for a collective across the two sides that failed (gloo: the peer's connection
    closed): who stopped, and the first sentence of the error without its source location."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = re.sub(r'^\[[^\]]*\]\s*', '', text).split('. ')[0]
    return PeerGone(f"{who} stopped answering ({text}): see its own output for why")


@dataclass
class Delivery:
    """One sampler's rollouts of a step, and how it spent the time since its last delivery."""
    rollouts: list            # batch.Rollout, in the order a colocated rank returns them
    sample_s: float           # drawing them
    wait_s: float             # blocked on the trainers (their weights, or taking the last ones)


def send_rollouts(roles, delivery):
    """A sampler: its share of a step to every trainer (returns once they have all taken it)."""
    group = roles.rollout_groups[roles.sampler_index]
    dist.broadcast_object_list([delivery], src=roles.rank, group=group)


def receive_rollouts(roles):
    """A trainer: every sampler's Delivery of the step, in sampler order (their rollouts
    concatenated are the pool a colocated run with k ranks deals)."""
    out = []
    for j, group in enumerate(roles.rollout_groups):
        box = [None]
        try:
            dist.broadcast_object_list(box, src=roles.sampler_rank(j), group=group)
        except RuntimeError as e:
            raise gone(f"sampler rank {roles.sampler_rank(j)}", e) from None
        out.append(box[0])
    return out


def sampler_figures(deliveries):
    """What a step's record says of the samplers: the slowest one's drawing time, its rate, and the
    longest wait."""
    generated = sum(len(r.response) for d in deliveries for r in d.rollouts)
    sample_s = max(d.sample_s for d in deliveries)
    return {'rollout_tok_s': generated / max(sample_s, 1e-9), 'sampler/sample_s': sample_s,
            'sampler/wait_s': max(d.wait_s for d in deliveries)}


# --------------------------------------------------------------------------------------- weights

def bucketed(shapes, itemsize, bucket_bytes=BUCKET_BYTES):
    """Tensor indices grouped into buckets of about bucket_bytes (each at least one tensor); both
    sides compute the same buckets from the header."""
    buckets, current, size = [], [], 0
    for i, shape in enumerate(shapes):
        current.append(i)
        size += torch.Size(shape).numel() * itemsize
        if size >= bucket_bytes:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets


def sync_samplers(roles, model, dtype, stop, device):
    """Every trainer, after the optimizer step: the header (stop, or the tensors' names and
    shapes), then unless stopping the student's weights in dtype, gathered over the trainers (a
    collective: every trainer iterates) and broadcast by trainer 0 in buckets."""
    named = [(name, tuple(p.shape)) for name, p in synced_parameters(model)]
    header = [None if stop else (named, dtype)]
    try:
        if roles.rank == 0:
            dist.broadcast_object_list(header, src=0, group=roles.sync_group)
        if stop:
            return
        tensors = fsdp_named_tensors(model, dtype=dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        for bucket in bucketed([shape for _, shape in named], itemsize):
            parts = [next(tensors)[1] for _ in bucket]
            if roles.rank == 0:
                flat = torch.cat([t.reshape(-1) for t in parts]).to(device)
                dist.broadcast(flat, src=0, group=roles.sync_group)
    except RuntimeError as e:
        samplers = [roles.sampler_rank(j) for j in range(roles.n_samplers)]
        who = f"sampler rank {samplers[0]}"
        if len(samplers) > 1:
            who = f"one of the sampler ranks {samplers}"
        raise gone(who, e) from None


def receive_header(roles):
    """A sampler: None when the trainers stop, else the names and shapes of the weights that
    follow and their dtype (received_tensors)."""
    header = [None]
    dist.broadcast_object_list(header, src=0, group=roles.sync_group)
    return header[0]


def received_tensors(roles, header, device):
    """A sampler: the new weights as (HF name, tensor) pairs, each bucket received as it is reached;
    to be consumed in full (update_weights) before anything else crosses."""
    named, dtype = header
    itemsize = torch.empty((), dtype=dtype).element_size()
    for bucket in bucketed([shape for _, shape in named], itemsize):
        shapes = [torch.Size(named[i][1]) for i in bucket]
        flat = torch.empty(sum(s.numel() for s in shapes), dtype=dtype, device=device)
        dist.broadcast(flat, src=0, group=roles.sync_group)
        offset = 0
        for i, shape in zip(bucket, shapes):
            yield named[i][0], flat[offset:offset + shape.numel()].view(shape)
            offset += shape.numel()


# ------------------------------------------------------------------------------ a sampler's run

@dataclass
class Schedule:
    """Which steps a sampler draws and when: the same loop bounds as the trainers'."""
    first_step: int           # the step the run (re)starts at
    max_steps: int
    off_policy_steps: int     # s: 0 or 1
    first_in_checkpoint: bool  # s = 1, resumed: the checkpoint holds the first step's rollouts


def serve(roles, sampler, make_rollouts, schedule, device):
    """A sampler rank's whole run. make_rollouts(step) -> its share of the step's rollouts (sampler
    None: a rank of a tensor-parallel engine that another rank drives, with no share). With
    s = 0 the trainers wait for each step's rollouts; with s = 1 this rank draws step t+1's while
    they train step t, with the weights after t updates, then takes the weights after t+1. The
    trainers do the mirror image: take step t's rollouts, train, (s = 1: take step t+1's), send
    the new weights or stop. Each Delivery reports the time this rank waited since the last one:
    blocked handing over the last rollouts, and for the header of the weights."""
    s = schedule.off_policy_steps
    waited = 0.0

    def deliver(step):
        nonlocal waited
        started = time.perf_counter()
        seqs = make_rollouts(step)
        drawn = time.perf_counter()
        send_rollouts(roles, Delivery(seqs, drawn - started, waited))
        waited = time.perf_counter() - drawn

    try:
        if not schedule.first_in_checkpoint:
            deliver(schedule.first_step)
        for step in range(schedule.first_step, schedule.max_steps):
            more = step + 1 < schedule.max_steps
            if s and more:
                deliver(step + 1)
            asked = time.perf_counter()
            header = receive_header(roles)
            waited += time.perf_counter() - asked
            if header is None:
                return
            weights = received_tensors(roles, header, device)
            if sampler is None:
                # a rank whose GPU serves another rank's engine: the weights pass it by
                for _ in weights:
                    pass
            else:
                sampler.update_weights(weights)
            if not s and more:
                deliver(step + 1)
    except RuntimeError as e:
        raise gone("the trainers", e) from None
