"""
On-policy distillation: OPRD (hidden states), the output-space OPD baselines, and SFT, in one
explicit loop.

One node of 8 GPUs (the paper's main setting, METHOD.md §5):
$ torchrun --standalone --nproc_per_node=8 distill.py config/qwen.py
A baseline on the same setting:
$ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_opd_topk.py
One process (CPU or one GPU), overrides on the command line:
$ python distill.py config/tiny.py --method=opd --max_steps=20
OPRD-Bridge (METHOD.md §4, a teacher of another width): stage 1 fits the frozen bridge, stage 2
distills through it:
$ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_bridge.py --method=bridge_fit
$ torchrun --standalone --nproc_per_node=8 distill.py config/qwen_bridge.py
A teacher of another tokenizer (METHOD.md §4b) reads its own encoding of each rollout (align.py):
the same two commands with config/phi4_qwen3.py.

Per step (train() at the bottom reads as the paper's algorithm box): this rank's share of the
step's prompts -> rollouts of the current student (rollout.py), dealt across ranks by length -> per
micro-batch, teacher forward (no grad), student forward + backward -> optimizer step -> new weights
pushed to the sampler -> log -> checkpoint. Under `oprd` alone the teacher computes no logits and
runs only up to its deepest tapped layer, and the student's head sees only the few hundred
positions where it re-scores the sampler's tokens (check_tokens). Every process, one or many,
trains in a process group with the student under FSDP2, so one GPU trains as a one-rank torchrun.
"""
import dataclasses
import math
import os
import sys
import warnings

import torch
import torch.distributed as dist

from batch import DistillError, filler_batch, micro_batch, micro_batches
from bridge import arch, fit_stage1, init_projector
from checks import check_settings
from configurator import configure
from fsdp import (MemoryMeter, StepClock, all_reduce_max, all_reduce_sum, clip_grad_norm, deal_pool,
                  drop_logged_steps_from, is_dist, load_training_state, read_resume,
                  save_checkpoint, setup_distributed, shard, shard_projector)
from losses import Maps, micro_batch_loss
from model import checkpoints_in, resolve_checkpoint
from ranks import Schedule, agree_to_start, make_roles, sampler_figures, serve, sync_samplers
from shares import RolloutSettings, dealt, received, rollouts, rollouts_to_save, saved_rollouts
from startup import close_samplers, load_prompts, load_tokenizers, make_engine, start, width_maps
from steplog import (StepTotals, announce, check_ahead, sampler_gap, stale_sampler, step_record,
                     write_record)

# -----------------------------------------------------------------------------
# default config values, overridden by config/*.py and --key=value
out_dir = 'out'
init_from = 'scratch'         # 'scratch' (student from `student`)
                              # | 'resume' (newest checkpoint in out_dir)
student = ''                  # HF checkpoint folder of the student
teacher = ''                  # HF checkpoint folder of the frozen teacher
method = 'oprd'               # oprd | opd | opd_topk | opd_full | opd+oprd | opd_topk+oprd | sft
                              # | bridge_fit (OPRD-Bridge stage 1) | oprd_bridge (stage 2)
                              # | opd_chunk | opd_chunk+oprd | opd_chunk+oprd_bridge
                              # (chunk-level OPD, any tokenizers)
# data
prompts = 'dapo17k'           # benchmark name, builtin task name, or a .jsonl file
                              # (data.load_problems)
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
max_num_seqs = 64             # vLLM's most concurrent sequences: enough for one training step's
                              # rollouts; fewer CUDA graphs to capture and less memory. An engine
                              # gets prompts_per_step / (ranks / tensor_parallel_size) prompts
                              # (rounded up) x n_samples a step: 2 for config/qwen.py on 8 GPUs,
                              # 16 on one. More is fine: vLLM queues what does not fit
tensor_parallel_size = 1      # vLLM tensor parallelism: a group's ranks share prompts, then split
                              # the rollouts
rollout_ranks = 0             # k > 0: the last k ranks only sample (an engine each, its device to
                              # itself, gpu_memory_utilization of it), the others only train
                              # (ranks.py); 0: every rank trains and samples
off_policy_steps = -1         # s (0 or 1): step t trains on rollouts of the weights after
                              # max(t - s, 0) updates; 1 samples step t+1's rollouts while step t
                              # trains (before it, without sampler ranks), so they come from the
                              # weights one update old. -1: 1 with sampler ranks, else 0
importance_cap = 2.0          # off_policy_steps=1, opd and opd_chunk only: each sampled token
                              # (chunk) weighs min(p_student / p_sampler, importance_cap), the
                              # truncated importance ratio; 0: no weight
# OPRD (METHOD.md §2)
layers = 'all'                # last | all | even | odd | '4,8,12'
                              # (student layers, output_hidden_states indices)
positions = 'last_k'          # all | first_k | last_k
k_positions = 2000
distance = 'mse'              # mse (raw MSE / d) | normalized_mse (MSE of L2-normalised states)
align = 'predict'             # 'predict': the state that predicts token t (position t-1);
                              # 'token': the state at t
align_whitespace = False      # across tokenizers (align.py): compare only chunks that end at
                              # whitespace (ALM)
max_unaligned_share = 0.5     # across tokenizers: stop when more than this share of a step's
                              # rollouts has no chunk the teacher reads as the student wrote it
oprd_coef = 1.0
mu = 1.0                      # weight of OPRD in the combined objectives opd+oprd, opd_topk+oprd
projector = False             # learn a linear map d_S -> d_T per layer when the widths differ
projector_init = 'random'     # its start: nn.Linear's init (the paper)
                              # | lstsq (least squares on step 0's rollouts)
# OPRD-Bridge (METHOD.md §4): a frozen rank-r bridge per layer, fit by method=bridge_fit, used by
# oprd_bridge
bridge_path = ''              # folder: bridge.safetensors + bridge.json
bridge_rank = 0               # r: the teacher's top-r principal directions; 0: 8, or 4 when the
                              # tokenizers differ
bridge_rows = 16384           # at most this many rows per layer (gathered over ranks) for the PCA
                              # and P_S
bridge_lr = 1e-4              # P_S: AdamW, weight decay 0, 10% of the rows held out, best
                              # held-out cosine kept
bridge_epochs = 20
bridge_batch_size = 256
bridge_init = 'random'        # P_S starts from nn.Linear's init (the paper) or 'lstsq'
                              # (the closed-form solution)
# output-space OPD (METHOD.md §3)
topk = 16
vocab_chunk_tokens = 1024     # output losses run over this many positions at a time:
                              # no [B, T, V] tensor
# optimization
max_steps = 500
micro_batch_size = 4          # sequences per forward/backward; the step accumulates over the
                              # rank's rollouts
lr = 1e-5
min_lr = 0.0
warmup_frac = 0.03
weight_decay = 0.01
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
activation_checkpointing = False
device = 'auto'               # auto (cuda if there is one) | cpu | cuda
dist_timeout_min = 120        # collectives wait this long (rank 0 writing a many-GB checkpoint
                              # while others wait)
teacher_fsdp = False          # shard the teacher with FSDP2 too (when it does not fit replicated)
max_bad_steps = 3             # consecutive NaN/inf steps before the run stops
check_tokens = 256            # per step and rank: sampled tokens whose log-probs the student
                              # recomputes (0 = off)
stale_factor = 10.0           # stop when that gap (mean |d log p|) exceeds this many times its
                              # first step's (at least 0.01 nats): the sampler is not serving the
                              # trained weights
stop_step = 0                 # >0: stop after this many steps as if preempted (the schedule
                              # still spans max_steps)
# io
seed = 0
log_every = 1
save_every = 100              # also saved at the last step
keep_checkpoints = 2
wandb_log = False
wandb_project = 'oprd'
# -----------------------------------------------------------------------------

# ---------------------------------------------------------------------- the schedule

def lr_at(step):
    """Linear warm-up over warmup_frac of the run, then cosine decay to min_lr."""
    warmup = max(1, math.ceil(warmup_frac * max_steps))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


# ---------------------------------------------------------------------- the optimizer

def make_optimizer(stu, proj):
    """AdamW over the student (and projector), weight decay on matrices only; fused on a GPU. On a
    CPU foreach: bit for bit the per-parameter loop, with each operation sent through FSDP2's
    DTensor once for all parameters."""
    params = list(stu.parameters()) + (list(proj.parameters()) if proj is not None else [])
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    on_gpu = next(stu.parameters()).device.type == 'cuda'
    opt = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), fused=on_gpu, foreach=not on_gpu)
    return opt, params


# ---------------------------------------------------------------------- the step's pieces

def rollout_settings(plan):
    """What every sampler draws a step with (shares.RolloutSettings): the trainers' settings, sent
    to sampler ranks once before the first step."""
    reference = method == 'sft'
    # the sampler check and the importance weight read the sampler's log-probs
    logprobs = check_tokens > 0 or plan.importance_cap > 0
    return RolloutSettings(prompts_per_step, n_samples, temperature, top_p, top_k, max_new_tokens,
                           seed, logprobs, 1 if reference else tensor_parallel_size,
                           reference, align_whitespace, enable_thinking)


# ---------------------------------------------------------------------- OPRD-Bridge stage 1

def bridge_batches(sampler, items, rank, world, tokenizers, dev, plan):
    """Stage 1's input, one rollout step at a time: the student's rollouts of the training prompts
    (the training steps' order and seeds, one pass at most) as micro-batches, each with the
    positions stage 2 supervises."""
    settings = rollout_settings(plan)
    for step in range(max(1, len(items) // prompts_per_step)):
        seqs = rollouts(sampler, items, step, rank, world, tokenizers, settings)
        yield supervised_batches(seqs, plan, tokenizers, dev)


def supervised_batches(seqs, plan, tokenizers, dev):
    """Rollouts as micro-batches, each with the positions stage 2 (and OPRD) supervises."""
    batches = [micro_batch(seqs[i:i + micro_batch_size], plan, tokenizers, dev)
               for i in range(0, len(seqs), micro_batch_size)]
    return [(b, b.oprd_mask) for b in batches]


def fit_bridge(cfg):
    """OPRD-Bridge stage 1 (method=bridge_fit): both models frozen and replicated, no optimizer;
    the bridge is fit on the student's rollouts and written to bridge_path (bridge.fit_stage1)."""
    rank, world, dev = setup_distributed(device, dist_timeout_min)
    loaded = start(cfg, dev, None, None, make_roles(0))
    stu, tea, tokenizers, plan = loaded.student, loaded.teacher, loaded.tokenizers, loaded.plan
    # the authors' settings
    cfg['bridge_rank'] = bridge_rank or (8 if tokenizers.teacher is None else 4)
    # the rank check
    width_maps(cfg, plan, stu, tea, dev, cfg['bridge_rank'])
    # the compute dtype
    stu = stu.to(next(tea.parameters()).dtype).eval().requires_grad_(False)
    steps = bridge_batches(loaded.sampler, loaded.items, rank, world, tokenizers, dev, plan)
    paths = (loaded.student_path, loaded.teacher_path)
    fit_stage1(stu, tea, steps, plan, cfg, paths, dev)


# ---------------------------------------------------------------------- the run

def serve_rollouts(cfg, dev, roles, resume_path, state):
    """A sampler rank's run (rollout_ranks > 0): the tokenizers and prompts the trainers use, one
    engine on this rank's device with nothing else on it, then ranks.serve until the trainers
    stop. Sampler j draws what rank j of a colocated run of k ranks draws. A vLLM engine with
    tensor_parallel_size = tp spans the devices of tp consecutive sampler ranks: the first of them
    starts it (a world of its own) and draws its group's share; the others only lend their
    device."""
    import rollout
    sampler, error = None, None
    j, k, tp = roles.sampler_index, roles.n_samplers, tensor_parallel_size
    on_vllm = backend == 'vllm' or (backend == 'auto' and rollout.vllm_device_type() == dev.type)
    lends_device = on_vllm and j % tp != 0
    try:
        student_path = resolve_checkpoint(resume_path or student)
        tokenizers = load_tokenizers(cfg, student_path, resolve_checkpoint(teacher))
        items = load_prompts(cfg, tokenizers.student)
        if not lends_device:
            dp_rank = j // tp if on_vllm else j
            sampler = make_engine(cfg, student_path, dev, tokenizers.student.vocab_size, False,
                                  dp_rank=dp_rank)
    except (DistillError, ValueError, OSError) as e:
        error = str(e)
    offers = agree_to_start(roles, error, sampler.dtype if sampler is not None else None)
    # trainer 0's
    settings = offers[0]

    def make_rollouts(step):
        if lends_device:
            return []
        if on_vllm and tp > 1:
            # the engine serves its whole group: prompts, seed and draws of that group's ranks
            whole = dataclasses.replace(settings, tensor_parallel_size=1)
            return rollouts(sampler, items, step, j // tp, k // tp, tokenizers, whole)
        return rollouts(sampler, items, step, j, k, tokenizers, settings)

    start_step = state['step'] if state is not None else 0
    in_checkpoint = state is not None and state.get('ahead') is not None
    serve(roles, sampler, make_rollouts,
          Schedule(start_step, max_steps, off_policy_steps, in_checkpoint), dev)


def train(cfg):
    """The algorithm box: per step, rollouts -> teacher forward -> student forward/backward ->
    optimizer step -> weight sync -> log -> checkpoint. With sampler ranks, the ranks that train
    run this loop over their own group, and the rollouts and weights cross to the sampler ranks
    (ranks.py)."""
    from rollout import fsdp_named_tensors
    _, _, dev = setup_distributed(device, dist_timeout_min)
    roles = make_roles(rollout_ranks)
    resume_path = checkpoints_in(out_dir)[-1] if init_from == 'resume' else None
    state = read_resume(resume_path, DistillError) if resume_path else None
    if roles.is_sampler:
        return serve_rollouts(cfg, dev, roles, resume_path, state)
    # from here on this rank trains: rank and world are among the trainers
    group = roles.train_group
    rank, world = dist.get_rank(group), roles.n_trainers
    split = roles.n_samplers > 0
    error = None
    try:
        loaded = start(cfg, dev, resume_path, state, roles)
        stu, tea, tokenizers, plan = loaded.student, loaded.teacher, loaded.tokenizers, loaded.plan
        items, sampler = loaded.items, loaded.sampler
        proj, bridge, bridge_meta = width_maps(cfg, plan, stu, tea, dev)
    except (DistillError, ValueError, OSError) as e:
        if not split:
            raise
        error = str(e)
    if split:
        # the samplers start only if every rank can: they get trainer 0's rollout settings, the
        # trainers the engines' dtype (every sampler runs the same)
        offer = rollout_settings(plan) if rank == 0 and error is None else None
        sampler_dtype = agree_to_start(roles, error, offer)[roles.sampler_rank(0)]
    settings = rollout_settings(plan)
    archs = {'student_arch': arch(stu.config),
             'teacher_arch': arch(tea.config) if tea is not None else None}
    # least squares on step 0's rollouts, replicated (with sampler ranks: step 0's rollouts, which
    # the loop trains on too)
    first = None
    if proj is not None and state is None and projector_init == 'lstsq':
        if split:
            first = received(roles)
            step0 = supervised_batches(dealt(first[0], roles, tokenizers)[0], plan, tokenizers,
                                       dev)
        else:
            step0 = next(bridge_batches(sampler, items, rank, world, tokenizers, dev, plan))
        init_projector(proj, stu, tea, step0, plan, group)
        # those rollouts left the engine asleep and no update_weights follows them (the student
        # has not changed), so it is woken here: the one wake that update_weights does not do
        if sampler is not None:
            sampler.wake()

    # the student (and projector) under FSDP2, the optimizer, resumed state
    stu.activation_checkpointing = activation_checkpointing
    raw_stu = stu
    stu = shard(stu, dev, torch.bfloat16 if dev.type == 'cuda' else torch.float32, group)
    if tea is not None and teacher_fsdp:
        tea = shard(tea, dev, next(tea.parameters()).dtype, group)
    proj = shard_projector(proj, dev, group) if proj is not None else None
    opt, params = make_optimizer(stu, proj)
    start_step = state['step'] if state is not None else 0
    if state is not None:
        load_training_state(stu, proj, opt, state)
    filler = filler_batch(items[0], plan, tokenizers, dev, align_whitespace, enable_thinking)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if state is not None:
            # steps logged after the checkpoint ran again: their records go
            print(f"resuming from {resume_path} at step {start_step}")
            drop_logged_steps_from(out_dir, start_step)
        announce(cfg, plan, stu, loaded.student_path, bridge_meta, roles, len(items))
        if wandb_log:
            import wandb
            wandb.init(project=wandb_project, config=cfg)

    def sampled(step):
        """The step's rollouts: this rank's own share, or with sampler ranks every sampler's
        (the pool; received() also returns their Deliveries' figures)."""
        if split:
            return received(roles)
        return rollouts(sampler, items, step, rank, world, tokenizers, settings), None

    mem = MemoryMeter(dev)
    clock = StepClock(dev)
    bad_steps = 0
    first_gap = None
    reserved = 0
    # off_policy_steps=1: the rollouts of the next step, sampled before this one trains (with
    # sampler ranks: while it trains)
    ahead, ahead_figures = None, None
    if state is not None and state.get('ahead') is not None:
        ahead = saved_rollouts(state, 0 if split else rank, tokenizers, settings)
    for step in range(start_step, max_steps):
        # 1. rollouts of this rank's prompts with the current weights (reference solutions under
        # sft), dealt by length; the sampler is asleep once they are in. off_policy_steps=1: this
        # step trains those sampled one step before, and the next step's are sampled now (with
        # sampler ranks, they arrive after the backward)
        if ahead is not None:
            seqs, figures = ahead, ahead_figures
        elif first is not None:
            seqs, figures = first
        else:
            seqs, figures = sampled(step)
        ahead, ahead_figures, first = None, None, None
        more = step + 1 < max_steps
        if off_policy_steps and more and not split:
            ahead, _ = sampled(step + 1)
        clock.lap('rollout')
        seqs, load, alignment = dealt(seqs, roles, tokenizers)
        if alignment is not None and alignment.unaligned_share > max_unaligned_share:
            raise DistillError(
                f"step {step}: {alignment.unaligned} of {alignment.rollouts} rollouts have no "
                f"text the teacher's tokenizer reads as the student wrote it (more than "
                f"max_unaligned_share={max_unaligned_share}): this pair of tokenizers does "
                "not fit")
        mem.start()
        lr_now = lr_at(step)
        for opt_group in opt.param_groups:
            opt_group['lr'] = lr_now
        # one step behind, the check reads the rollouts ahead instead (check_ahead)
        step_check = 0 if off_policy_steps else check_tokens
        batches, counts, n_micro = micro_batches(seqs, plan, tokenizers, dev, micro_batch_size,
                                                 step_check, seed * 1_000_003 + step, group)
        totals = StepTotals.start(len(plan.s_layers), load, reserved)
        stu.train()
        clock.lap('rest')

        # 2-3. per micro-batch: teacher forward (no grad), student forward, loss, backward; the
        # gradients accumulate and are reduced across ranks after the last one. A rank with fewer
        # micro-batches runs zero-weight copies of `filler`. FSDP2 averages gradients over ranks,
        # and the loss is already divided by the global counts: times world makes the reduced
        # gradient that of the step's token mean.
        for i in range(n_micro):
            real = i < len(batches)
            b = batches[i] if real else filler
            weight = 1.0 if real else 0.0
            stu.set_requires_gradient_sync(i == n_micro - 1)
            # the teacher reads its own tokens; only the rows a loss reads are kept
            rows_t = None
            with torch.no_grad():
                if tea is not None:
                    t_in = b.for_teacher
                    rows_t = tea(t_in.ids, attention_mask=t_in.attention_mask, taps=plan.t_taps,
                                 rows=t_in.keep)
            clock.lap('teacher')
            hs_s = stu(b.ids, attention_mask=b.attention_mask, taps=plan.s_taps)
            # read each micro-batch, after the forward: FSDP2 may swap a parameter for its
            # gathered copy
            maps = Maps(stu.lm_head.weight, tea.lm_head.weight if tea is not None else None,
                        proj, bridge)
            loss, stats = micro_batch_loss(plan, b, hs_s, rows_t, counts, maps)
            gap = (0.0, 0)
            if weight and b.check.any():
                gap = sampler_gap(hs_s[plan.L_s], stu.lm_head.weight, b, stats.target_logp)
            (loss * (world * weight)).backward()
            clock.lap('student')
            if weight:
                totals.add(loss, stats, b, gap)
        if off_policy_steps and more and split:
            ahead, ahead_figures = sampled(step + 1)
            clock.lap('rollout')
        if off_policy_steps and check_tokens and more:
            # this rank's share of them (with sampler ranks the pool, dealt as the next step will)
            mine = deal_pool(ahead, world, rank)[0] if split else ahead
            gap_sum, gap_count = check_ahead(stu, mine, plan, tokenizers, dev, filler,
                                             seed * 1_000_003 + step + 1, check_tokens,
                                             micro_batch_size)
            totals.gap_sum += gap_sum
            totals.gap_count += gap_count
            clock.lap('rest')
        totals.reduce_gap(group)

        # 4. optimizer step, skipped when the loss or the gradient is not finite
        grad_norm = clip_grad_norm(params, grad_clip)
        loss = all_reduce_sum(totals.loss, group).item()
        bad_steps = 0 if math.isfinite(loss) and math.isfinite(grad_norm) else bad_steps + 1
        if bad_steps == 0:
            opt.step()
        elif rank == 0:
            print(f"step {step}: non-finite loss {loss} or grad norm {grad_norm}: step skipped "
                  f"({bad_steps} in a row)")
        opt.zero_grad(set_to_none=True)
        totals.step_loss = loss
        totals.lr = lr_now
        totals.grad_norm = grad_norm
        totals.transient_mem = all_reduce_max(mem.transient(), group)
        # the same decision on every rank: every figure in it is reduced
        stale = None
        if method != 'sft' and check_tokens:
            stale = stale_sampler(step, totals.gap, first_gap, stale_factor)
        if first_gap is None:
            first_gap = totals.gap
        stopping = bad_steps >= max_bad_steps or stale
        last = not more or (stop_step and step + 1 >= stop_step)
        clock.lap('optimizer')

        # 5. push the new weights to the sampler (streamed one parameter at a time). update_weights
        # wakes the sleeping engine itself (its weights, the sync, then its KV cache); the
        # trainer's cached blocks go back to the device first, so the waking engine finds its
        # memory. With sampler ranks: the weights in buckets, or that the run stops
        if sampler is not None:
            if dev.type == 'cuda':
                torch.cuda.empty_cache()
                reserved = torch.cuda.memory_reserved(dev)
            # each rank casts its fp32 shard to the engine's dtype before the all-gather
            sampler.update_weights(fsdp_named_tensors(stu, dtype=sampler.dtype))
        elif split:
            sync_samplers(roles, stu, sampler_dtype, bool(stopping or last), dev)
        clock.lap('sync')

        # 6. log (after the checkpoint, so the record carries its time) and checkpoint
        logged = step % log_every == 0 or step == max_steps - 1
        rec = None
        if logged:
            rec = step_record(step, totals, seqs, counts, plan, clock, method != 'sft',
                              check_tokens > 0, alignment, group)
            # (none for rollouts a resume read from the checkpoint)
            if figures:
                rec.update(sampler_figures(figures))
        # after the step's log line, so the log shows why the run stopped
        if stopping:
            if rank == 0 and logged:
                write_record(rec, plan, out_dir, wandb_log)
            raise DistillError(stale or f"{bad_steps} non-finite steps in a row: stopping")
        if (step + 1) % save_every == 0 or step == max_steps - 1:
            saved_ahead = rollouts_to_save(ahead, roles) if ahead is not None else None
            save_checkpoint(out_dir, keep_checkpoints, raw_stu, stu, opt, proj, step + 1,
                            dict(archs, config=cfg, ahead=saved_ahead), group)
        clock.lap('log_ckpt')
        # a collective: every rank, every step
        times = clock.split(group)
        if rank == 0 and logged:
            write_record(dict(rec, **times), plan, out_dir, wandb_log)
        if last:
            break
    # every rank's collectives (FSDP2's asynchronous reduce-scatters too) end before teardown
    dist.barrier(group=group)
    if rank == 0:
        print(f"done: {(checkpoints_in(out_dir) or [out_dir])[-1]}")


def resolve_defaults(cfg):
    """Settings whose default depends on others, decided once (the checkpoint records and a resume
    compares the decided value): off_policy_steps=-1 is 1 with sampler ranks (of a method that
    samples), else 0."""
    if cfg['off_policy_steps'] == -1:
        samples = cfg['method'] not in ('sft', 'bridge_fit')
        cfg['off_policy_steps'] = 1 if cfg['rollout_ranks'] and samples else 0
    globals().update(cfg)


def main():
    cfg = configure(globals(), __file__)
    try:
        resolve_defaults(cfg)
        check_settings(cfg)
        torch.manual_seed(seed)
        # tiny CPU models: denormals made steps 4x slower
        torch.set_flush_denormal(True)
        # numpy, after the above
        warnings.filterwarnings('ignore', message='The value of the smallest subnormal')
        fit_bridge(cfg) if method == 'bridge_fit' else train(cfg)
    # bad input (CheckpointError, DataError, BridgeError, a file)
    except (DistillError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        # before the process group goes: vLLM's teardown would destroy the shared group
        close_samplers()
        if is_dist():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
