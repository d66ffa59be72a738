"""
The distributed side of training (distill.py): every run is a process group (a plain process is a
group of one), the student is sharded with FSDP2, and figures are reduced over ranks. Also the
training checkpoint: the student in HF format plus resume.pt (optimizer, projector, RNG, the run's
config), written beside the target and renamed into place.
"""
import datetime
import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from model import checkpoints_in


def is_dist():
    return dist.is_available() and dist.is_initialized()


def _device():
    """Where collectives' tensors live: the GPU under NCCL, else the CPU."""
    if is_dist() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def all_reduce_sum(x, group):
    """Sum a float (or tensor) over the ranks of group (the trainers' under sampler ranks); a no-op
    in a single process."""
    t = torch.as_tensor(x, dtype=torch.float64, device=_device()).clone()
    if is_dist():
        dist.all_reduce(t, group=group)
    return t


def all_reduce_max(x, group):
    t = torch.tensor(float(x), dtype=torch.float64, device=_device())
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def setup_distributed(device, timeout_min):
    """torchrun sets RANK/WORLD_SIZE; a plain process becomes a group of one (an in-process store),
    so one process trains exactly as a one-rank torchrun does: same FSDP2 policy, bf16 on a GPU,
    same collectives. The timeout covers rank 0 writing a checkpoint of many GB while the others
    wait at a barrier."""
    use_cuda = device == 'cuda' or (device == 'auto' and torch.cuda.is_available())
    dev = torch.device('cpu')
    if use_cuda:
        dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(minutes=timeout_min)
    backend_name = 'nccl' if use_cuda else 'gloo'
    if 'RANK' in os.environ and use_cuda:
        # device_id: NCCL binds the rank's own GPU at the start, not cuda:0 at the first collective
        dist.init_process_group(backend_name, timeout=timeout, device_id=dev)
    elif 'RANK' in os.environ:
        dist.init_process_group(backend_name, timeout=timeout)
    else:
        dist.init_process_group(backend_name, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), dev


def mesh_of(group, device):
    """The 1-D device mesh of a process group (every rank's, or the trainers' under sampler ranks):
    FSDP2 shards over it, and DTensor's gathers and reductions run in it."""
    from torch.distributed.device_mesh import DeviceMesh
    return DeviceMesh.from_group(group, device.type)


def shard(model, device, mp_dtype, group, reshard=True):
    """FSDP2 over group's ranks: fully_shard each block, then the root. bf16 compute with fp32
    reduction on GPU; fp32 on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = mesh_of(group, device)
    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def shard_projector(proj, device, group):
    """The learned projector under FSDP2 too (in fp32: it is small): its gradients are reduced with
    the model's, and every parameter the optimizer sees is a DTensor (fused AdamW refuses a mix)."""
    from torch.distributed.fsdp import fully_shard
    # one start on every rank: global rank 0 is the first trainer
    for p in proj.parameters():
        dist.broadcast(p.data, 0, group=group)
    mesh = mesh_of(group, device)
    for lin in proj.values():  # each Linear is called on its own, so each is its own FSDP unit
        fully_shard(lin, mesh=mesh)
    return proj


def clip_grad_norm(params, max_norm):
    """Global grad norm over ranks (DTensor shards: full_tensor() reduces it), clipped to max_norm;
    returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    n = torch.nn.utils.get_total_norm(grads)
    norm = (n.full_tensor() if hasattr(n, 'full_tensor') else n).item()
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def deal(lengths, world):
    """Longest first, each to the least loaded rank (fewest sequences, then lowest rank, on ties):
    the rank of each sequence. verl's balance_batch deals the same way."""
    load, count, owner = [0] * world, [0] * world, [0] * len(lengths)
    # stable: ties keep their order
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = min(range(world), key=lambda k: (load[k], count[k], k))
        load[r], count[r], owner[i] = load[r] + lengths[i], count[r] + 1, r
    return owner


def balance(seqs, group):
    """The step's rollouts (batch.Rollout) of every rank of group, dealt again so that ranks carry
    about the same tokens. Without it both samples of a prompt stay on one rank, and the update
    waits for the rank that drew the longest responses. Returns this rank's share and the max/mean
    token load over ranks."""
    world = dist.get_world_size(group)
    if world == 1:
        return seqs, 1.0
    shares = [None] * world
    dist.all_gather_object(shares, seqs, group=group)
    return deal_pool([s for share in shares for s in share], world, dist.get_rank(group))


def deal_pool(pool, world, rank):
    """Rank's share of a pool of rollouts every rank holds (deal), and the max/mean token load."""
    lengths = [len(r.prompt) + len(r.response) for r in pool]
    owner = deal(lengths, world)
    load = [sum(n for n, r in zip(lengths, owner) if r == k) for k in range(world)]
    mine = [s for s, r in zip(pool, owner) if r == rank]
    return mine, max(load) / max(sum(load) / world, 1)


class MemoryMeter:
    """Transient peak memory of a region: peak during it minus memory at its start (the paper's
    Table 3).

    GPU: the caching allocator's counters. CPU: the process's resident set (VmHWM after a reset
    through /proc/self/clear_refs), a process-level measure that also sees allocator reuse.
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


class StepClock:
    """The step's wall clock split into named parts that add up to it: each lap() charges the time
    since the previous lap to one part. On a GPU each lap waits for the queued kernels, so a part is
    charged with its own work (a few syncs per micro-batch: small beside a forward of thousands of
    tokens)."""
    PARTS = ('rollout', 'teacher', 'student', 'optimizer', 'sync', 'log_ckpt', 'rest')

    def __init__(self, dev):
        self.cuda = dev.type == 'cuda'
        self.last = time.perf_counter()
        self.parts = dict.fromkeys(self.PARTS, 0.0)

    def lap(self, part):
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.parts[part] += now - self.last
        self.last = now

    def split(self, group):
        """This step's parts (max over group's ranks, as the slowest rank sets the pace) and their
        sum; starts the next."""
        parts = {f'time/{k}': all_reduce_max(v, group) for k, v in self.parts.items()}
        self.parts = dict.fromkeys(self.PARTS, 0.0)
        return dict(parts, **{'time/step': sum(parts.values())})


# ----------------------------------------------------------------------------- checkpoints

def trained_modules(model, proj):
    """Everything the optimizer updates, as one module: the state-dict API maps optimizer state by
    its names."""
    return model if proj is None else nn.ModuleDict({'student': model, 'projector': proj})


def read_resume(path, error=ValueError):
    """A checkpoint's resume.pt (path: its folder), tensors only (loading never runs code), memory-
    mapped: the ranks of a node read the same pages. A bad file raises `error` on every rank."""
    try:
        return torch.load(os.path.join(path, 'resume.pt'), weights_only=True, mmap=True,
                          map_location='cpu')
    except Exception as e:  # missing, truncated or foreign file
        first_line = str(e).splitlines()[0] if str(e) else ''
        raise error(f"corrupt or missing resume state {os.path.join(path, 'resume.pt')}: "
                    f"{type(e).__name__}: {first_line}") from None


def load_training_state(stu, proj, opt, state):
    """Optimizer (and projector) state from resume.pt, which every rank has read: each takes its
    own slice of every tensor into its shards (no collective, so it needs no group)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    if proj is not None:
        set_model_state_dict(proj, state['projector'], options=opts)
    # not strict: a parameter that never had a gradient (an LM head OPRD never uses) has no AdamW
    # state
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_optimizer_state_dict(trained_modules(stu, proj), opt, state['optimizer'], options=opts)
    torch.set_rng_state(state['rng'])


def save_checkpoint(out_dir, keep, raw_model, model, opt, proj, step, extra, group):
    """out_dir/step_NNNNNNN: the student in HF format + resume.pt, written by the first rank of
    group (the trainers). Written as step_N.partial and renamed, so a crash mid-save leaves the
    previous checkpoint whole; only checkpoints older than this one are pruned, to `keep` in all.
    extra: more entries of resume.pt (the run's config, the models' shapes)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)  # collectives: every rank takes part
    osd = get_optimizer_state_dict(trained_modules(model, proj), opt, options=opts)
    psd = get_model_state_dict(proj, options=opts) if proj is not None else None
    if dist.get_rank() == 0:
        final = os.path.join(out_dir, f'step_{step:07d}')
        partial = final + '.partial'
        shutil.rmtree(partial, ignore_errors=True)
        raw_model.save_pretrained(partial, state_dict=sd)
        torch.save({'step': step, 'optimizer': osd, 'projector': psd, 'rng': torch.get_rng_state(),
                    'world': dist.get_world_size(group), **extra},
                   os.path.join(partial, 'resume.pt'))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        older = [c for c in checkpoints_in(out_dir) if int(c[-7:]) < step]
        for old in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        print(f"saved {final}", flush=True)
    dist.barrier(group=group)


def drop_logged_steps_from(out_dir, step):
    """A resume from an older checkpoint runs steps >= step again: their records leave
    out_dir/log.jsonl."""
    path = os.path.join(out_dir, 'log.jsonl')
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)['step'] < step]
        with open(path + '.tmp', 'w') as f:
            f.writelines(kept)
        os.replace(path + '.tmp', path)
