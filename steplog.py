"""
What a run reports (distill.py): its header, each step's totals over the micro-batches, the
sampler's health (does it still serve the trained weights?), and the record printed and appended
to out_dir/log.jsonl.

    totals = StepTotals.start(n_layers, load)
    totals.add(loss, stats, batch, sampler_gap(h_final, head, batch, stats.target_logp))
    rec = step_record(step, totals, rollouts, counts, plan, clock, sampled, checked, None, group)
    write_record(rec, plan, out_dir, wandb_log)
"""
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batch import micro_batch, next_tokens
from fsdp import StepClock, all_reduce_max, all_reduce_sum


# ---------------------------------------------------------------------------- the run's header

def announce(cfg, plan, stu, student_path, bridge_meta, roles, n_prompts):
    """Rank 0, before the first step: what trains on what (cfg: the run's settings), the OPRD
    layers and positions, the bridge, and a step's size."""
    method, prompts_per_step, positions = cfg['method'], cfg['prompts_per_step'], cfg['positions']
    ranks = f"world {roles.world}"
    if roles.n_samplers:
        ranks += f" ({roles.n_trainers} train, {roles.n_samplers} sample)"
    print(f"method {method} | student {student_path} ({plan.L_s} layers, "
          f"d={stu.config.hidden_size}) | teacher {cfg['teacher'] or '-'} | {ranks} | "
          f"{n_prompts} prompts")
    if plan.s_layers:
        k_shown = '' if positions == 'all' else f" (k={cfg['k_positions']})"
        print(f"OPRD layers {plan.s_layers} -> teacher {plan.t_layers}; positions "
              f"{positions}{k_shown}; distance {cfg['distance']}; align {cfg['align']}")
    if bridge_meta is not None:
        cos = bridge_meta['heldout_cos']
        print(f"through the frozen bridge {cfg['bridge_path']}: rank {bridge_meta['rank']}, "
              f"held-out cosine {sum(cos.values()) / len(cos):.4f} (mean)")
    if method == 'sft':
        per_step = f"{prompts_per_step} reference solutions"
    else:
        n_samples = cfg['n_samples']
        per_step = (f"{prompts_per_step} prompts x {n_samples} samples = "
                    f"{prompts_per_step * n_samples} sequences")
    lag = cfg['off_policy_steps']
    lagged = f", rollouts {lag} update old" if lag else ''
    print(f"{per_step} per step, {cfg['max_steps']} steps{lagged}")


# ---------------------------------------------------------------------------- the sampler's health

def sampler_gap(h_final, w, batch, target_logp=None):
    """Sum and count of |log p_student - log p_sampler| of the sampled tokens at the positions
    batch.check (a few hundred per step): h_final the student's final-norm states (B, T, d), w its
    LM head, batch.logp_next the sampler's raw log-probability of the token each position predicts.
    A gap far above its first step's level means the sampler no longer serves the trained weights.
    target_logp: the student's log-probability of the token at every batch.out_mask position, when
    an output-space loss computed them: read there, not computed again."""
    rows = batch.check
    with torch.no_grad():
        if target_logp is not None:
            # the check's positions are among the loss's (supervise picks them so)
            mine = target_logp[rows[batch.out_mask]]
        else:
            # log p = logit - logsumexp: no (rows, V) log-softmax
            logits = F.linear(h_final[rows].float(), w.float())
            sampled = next_tokens(batch.ids, rows)
            mine = logits.gather(1, sampled[:, None])[:, 0] - logits.logsumexp(-1)
        return (mine - batch.logp_next[rows]).abs().sum().item(), rows.sum().item()


def stale_sampler(step, gap, first_gap, factor):
    """After the first step rollouts come from synced weights: a sampler whose log-probs drift far
    from the student's missed the sync (TRL #5312). Returns the reason to stop, or None."""
    if first_gap is None or gap <= factor * max(first_gap, 0.01):
        return None
    return (f"step {step}: stale sampler weights: the sampler's log-probs of its own tokens "
            f"differ from the student's by {gap:.4f} nats on average ({first_gap:.4f} at the "
            "first step); the weight sync did not reach the engine")


def check_ahead(stu, ahead, plan, tokenizers, dev, filler, check_seed, check_tokens,
                micro_batch_size):
    """The sampler check under off_policy_steps=1: the sampler holds the weights this step trains,
    which made the next step's rollouts (ahead), so the student re-scores check_tokens of those:
    one no-grad forward of the fewest rollouts whose responses hold that many tokens (at most
    micro_batch_size of them), the filler batch where a rank has none. Returns sampler_gap's
    (sum, count)."""
    gen = torch.Generator().manual_seed(check_seed)
    batch = filler
    if ahead:
        lengths = torch.tensor([len(r.response) for r in ahead]).cumsum(0)
        enough = int((lengths < check_tokens).sum()) + 1
        few = ahead[:min(enough, micro_batch_size)]
        batch = micro_batch(few, plan, tokenizers, dev, gen, check_tokens)
    with torch.no_grad():
        final = stu(batch.ids, attention_mask=batch.attention_mask, taps=[plan.L_s])[plan.L_s]
        gap = (0.0, 0)
        if ahead and batch.check.any():
            gap = sampler_gap(final, stu.lm_head.weight, batch)
    # a forward without backward leaves the root's parameters gathered: resharded, the optimizer
    # step and the weight sync see the sharded ones (else the sync sends the root's stale copy)
    stu.reshard()
    return gap


# ----------------------------------------------------------------------------- the step's figures

@dataclass
class StepTotals:
    """The step's figures on this rank: sums over its real micro-batches, then the step's
    results."""
    layer_loss: list
    layer_cos: list
    load: float                   # max/mean token load over ranks (fsdp.balance)
    reserved_at_wake: int = 0     # GPU: what the trainer still holds when the engine wakes
    loss: float = 0.0             # this rank's sum of its micro-batches' losses
    step_loss: float = 0.0        # the step's loss: that sum over ranks
    kl: float = 0.0
    tokens: int = 0
    gap_sum: float = 0.0
    gap_count: int = 0
    gap: float = 0.0              # the mean sampler gap over ranks, once reduced
    # opd, opd_chunk one step behind: their importance weights' sum, count and capped count
    weight_sum: float = 0.0
    weight_count: int = 0
    weight_capped: int = 0
    lr: float = 0.0
    grad_norm: float = 0.0
    transient_mem: int = 0        # the update's transient peak memory, max over ranks

    @classmethod
    def start(cls, n_layers, load, reserved_at_wake=0):
        return cls([0.0] * n_layers, [0.0] * n_layers, load, reserved_at_wake)

    def add(self, loss, stats, batch, gap):
        """One real micro-batch's figures (loss, losses.LossStats, its Batch, sampler_gap's sum and
        count)."""
        self.loss += loss.item()
        self.kl += stats.kl
        self.tokens += batch.attention_mask.sum().item()
        self.gap_sum = self.gap_sum + gap[0]
        self.gap_count = self.gap_count + gap[1]
        self.weight_sum += stats.weight_sum
        self.weight_count += stats.weight_count
        self.weight_capped += stats.weight_capped
        self.layer_loss = [x + y for x, y in zip(self.layer_loss, stats.layer_loss)]
        self.layer_cos = [x + y for x, y in zip(self.layer_cos, stats.layer_cos)]

    def reduce_gap(self, group):
        """The sampler gap's mean over the checked tokens of every rank of group (a collective)."""
        gap_sum, gap_count = all_reduce_sum([self.gap_sum, self.gap_count], group).tolist()
        self.gap = gap_sum / max(gap_count, 1)


def step_record(step, totals, rollouts, counts, plan, clock, sampled, checked, alignment, group):
    """The step's figures, reduced over group's ranks (the trainers): what is printed and appended
    to log.jsonl. sampled: the rollouts came from a sampler (not sft); checked: it re-scored their
    tokens (check_tokens > 0); alignment: across tokenizers, batch.Alignment (the rollouts left
    out, the share of response bytes compared), else None."""
    n_seqs = all_reduce_sum(len(rollouts), group).item()
    generated = all_reduce_sum(sum(len(r.response) for r in rollouts), group).item()
    truncated = all_reduce_sum(sum(r.finish == 'length' for r in rollouts), group).item()
    update_time = clock.parts['teacher'] + clock.parts['student'] + clock.parts['optimizer']
    rec = {'step': step, 'loss': totals.step_loss, 'grad_norm': totals.grad_norm, 'lr': totals.lr,
           'sequences': n_seqs, 'mean_response_len': generated / max(n_seqs, 1),
           'trunc_rate': truncated / max(n_seqs, 1),
           'update_tok_s': (all_reduce_sum(totals.tokens, group).item()
                            / max(all_reduce_max(update_time, group), 1e-9)),
           'update_transient_mem_mb': totals.transient_mem / 2**20}
    if sampled:
        rec['rollout_tok_s'] = generated / max(all_reduce_max(clock.parts['rollout'], group), 1e-9)
        rec['load_max_over_mean'] = totals.load
        if checked:
            rec['sampler_logp_gap'] = totals.gap
        if totals.reserved_at_wake:
            rec['reserved_mb_at_wake'] = totals.reserved_at_wake / 2**20
    if alignment is not None:
        rec['rollouts_unaligned'] = alignment.unaligned
        rec['aligned_byte_share'] = alignment.byte_share
    for j, layer in enumerate(plan.s_layers):
        layer_loss = all_reduce_sum(totals.layer_loss[j], group).item()
        layer_cos = all_reduce_sum(totals.layer_cos[j], group).item()
        rec[f'oprd_loss/{layer}'] = layer_loss / max(counts.states, 1)
        rec[f'cos/{layer}'] = layer_cos / max(counts.states, 1)
    if plan.out_kind:
        rec['kl'] = all_reduce_sum(totals.kl, group).item() / max(counts.outputs, 1)
    if plan.importance_cap:
        weights = [totals.weight_sum, totals.weight_count, totals.weight_capped]
        weight_sum, weight_count, weight_capped = all_reduce_sum(weights, group).tolist()
        rec['importance_weight_mean'] = weight_sum / max(weight_count, 1)
        rec['importance_capped_share'] = weight_capped / max(weight_count, 1)
    return rec


def write_record(rec, plan, out_dir, wandb_log=False):
    """Rank 0: the step's line on stdout, its record in log.jsonl (and wandb)."""
    extra = ''
    if plan.out_kind:
        extra += f" | kl {rec['kl']:.4f}"
    if plan.s_layers:
        mean_cos = sum(rec[f'cos/{layer}'] for layer in plan.s_layers) / len(plan.s_layers)
        extra += f" | cos {mean_cos:.4f}"
    if 'rollout_tok_s' in rec:
        extra += f" | rollout {rec['rollout_tok_s']:.0f} tok/s"
    if 'sampler_logp_gap' in rec:
        extra += f" | dlogp {rec['sampler_logp_gap']:.4f}"
    if 'importance_weight_mean' in rec:
        extra += (f" | weight {rec['importance_weight_mean']:.4f}, "
                  f"{rec['importance_capped_share']:.0%} capped")
    if 'aligned_byte_share' in rec:
        extra += (f" | aligned {rec['aligned_byte_share']:.0%} of bytes, "
                  f"{rec['rollouts_unaligned']} rollouts left out")
    shown = [k for k in StepClock.PARTS if rec.get(f'time/{k}', 0) >= 0.005]
    times = ' '.join(f"{k} {rec[f'time/{k}']:.2f}" for k in shown)
    print(f"step {rec['step']}: loss {rec['loss']:.6f} | grad {rec['grad_norm']:.3f} | "
          f"lr {rec['lr']:.2e} | len {rec['mean_response_len']:.1f} | "
          f"trunc {rec['trunc_rate']:.2f}{extra} | update {rec['update_tok_s']:.0f} tok/s | "
          f"mem +{rec['update_transient_mem_mb']:.1f} MB | "
          f"{rec.get('time/step', 0):.2f} s ({times})", flush=True)
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(rec) + '\n')
    if wandb_log:
        import wandb
        wandb.log(rec, step=rec['step'])
