"""
What distill.py's settings may be, checked before any work: the methods, one DistillError line for
the first setting or input that cannot work (check_settings, before a model loads or a folder is
made), and what a resumed run must keep (check_resume).

    cfg = configure(globals(), __file__)
    check_settings(cfg)
"""
import os
from types import SimpleNamespace

import torch
import torch.distributed as dist

from batch import DistillError
from bridge import arch
from model import checkpoints_in

METHODS = ('oprd', 'opd', 'opd_topk', 'opd_full', 'opd+oprd', 'opd_topk+oprd', 'sft',
           'bridge_fit', 'oprd_bridge', 'opd_chunk', 'opd_chunk+oprd', 'opd_chunk+oprd_bridge')
# stage 2 of OPRD-Bridge, alone or with chunk-level OPD
THROUGH_BRIDGE = ('oprd_bridge', 'opd_chunk+oprd_bridge')
# token-level output losses
ONE_VOCABULARY = ('opd', 'opd_topk', 'opd_full', 'opd+oprd', 'opd_topk+oprd')


def bad_setting(key, value, allowed):
    """The one-line error for a setting outside what it allows."""
    return DistillError(f"{key}={value!r}: must be {allowed}")


def check_settings(cfg):
    """One DistillError for the first setting or input that cannot work, before any model loads or
    any folder is made. Checks that need the models (layers in range, widths, tokenizers) come right
    after loading. cfg: distill.py's settings, as configure() returns them."""
    s = SimpleNamespace(**cfg)
    if s.method not in METHODS:
        raise DistillError(f"method={s.method!r} does not exist: "
                           f"choose one of {', '.join(METHODS)}")
    if s.init_from not in ('scratch', 'resume'):
        raise bad_setting('init_from', s.init_from, 'scratch or resume')
    if s.backend not in ('auto', 'vllm', 'torch'):
        raise bad_setting('backend', s.backend, 'auto, vllm or torch')
    if s.device not in ('auto', 'cpu', 'cuda'):
        raise bad_setting('device', s.device, 'auto, cpu or cuda')
    if s.positions not in ('all', 'first_k', 'last_k'):
        raise bad_setting('positions', s.positions, 'all, first_k or last_k')
    if s.distance not in ('mse', 'normalized_mse'):
        raise bad_setting('distance', s.distance, 'mse or normalized_mse')
    if s.align not in ('predict', 'token'):
        raise bad_setting('align', s.align, 'predict or token')
    if s.projector_init not in ('random', 'lstsq'):
        raise bad_setting('projector_init', s.projector_init, 'random or lstsq')
    if s.bridge_init not in ('random', 'lstsq'):
        raise bad_setting('bridge_init', s.bridge_init, 'random or lstsq')
    if not s.prompts_per_step >= 1:
        raise bad_setting('prompts_per_step', s.prompts_per_step, '>= 1')
    if not s.n_samples >= 1:
        raise bad_setting('n_samples', s.n_samples, '>= 1')
    if not s.max_new_tokens >= 1:
        raise bad_setting('max_new_tokens', s.max_new_tokens, '>= 1')
    if not s.max_prompt_len >= 1:
        raise bad_setting('max_prompt_len', s.max_prompt_len, '>= 1')
    if not s.k_positions >= 1:
        raise bad_setting('k_positions', s.k_positions, '>= 1')
    if not s.topk >= 1:
        raise bad_setting('topk', s.topk, '>= 1')
    if not s.vocab_chunk_tokens >= 1:
        raise bad_setting('vocab_chunk_tokens', s.vocab_chunk_tokens, '>= 1')
    if not s.max_steps >= 1:
        raise bad_setting('max_steps', s.max_steps, '>= 1')
    if not s.micro_batch_size >= 1:
        raise bad_setting('micro_batch_size', s.micro_batch_size, '>= 1')
    if not s.max_bad_steps >= 1:
        raise bad_setting('max_bad_steps', s.max_bad_steps, '>= 1')
    if not s.log_every >= 1:
        raise bad_setting('log_every', s.log_every, '>= 1')
    if not s.save_every >= 1:
        raise bad_setting('save_every', s.save_every, '>= 1')
    if not s.keep_checkpoints >= 1:
        raise bad_setting('keep_checkpoints', s.keep_checkpoints, '>= 1')
    if not s.tensor_parallel_size >= 1:
        raise bad_setting('tensor_parallel_size', s.tensor_parallel_size, '>= 1')
    # the configurator has already refused a value that is not an int (max_num_seqs's default is)
    if not s.max_num_seqs >= 1:
        raise bad_setting('max_num_seqs', s.max_num_seqs, '>= 1')
    if not s.bridge_rows >= 1:
        raise bad_setting('bridge_rows', s.bridge_rows, '>= 1')
    if not s.bridge_epochs >= 1:
        raise bad_setting('bridge_epochs', s.bridge_epochs, '>= 1')
    if not s.bridge_batch_size >= 1:
        raise bad_setting('bridge_batch_size', s.bridge_batch_size, '>= 1')
    if not s.dist_timeout_min >= 1:
        raise bad_setting('dist_timeout_min', s.dist_timeout_min, '>= 1')
    if not s.weight_decay >= 0:
        raise bad_setting('weight_decay', s.weight_decay, '>= 0')
    if not s.grad_clip >= 0:
        raise bad_setting('grad_clip', s.grad_clip, '>= 0')
    if not s.mu >= 0:
        raise bad_setting('mu', s.mu, '>= 0')
    if s.off_policy_steps not in (0, 1):
        raise bad_setting('off_policy_steps', s.off_policy_steps, '0 or 1')
    if s.off_policy_steps and s.method in ('sft', 'bridge_fit'):
        raise DistillError(f"off_policy_steps=1 with method={s.method}: it has no rollouts of "
                           "the trained weights to delay")
    if not (s.importance_cap == 0 or s.importance_cap >= 1):
        raise bad_setting('importance_cap', s.importance_cap, '0 (off) or >= 1')
    if not 0 <= s.max_unaligned_share < 1:
        raise bad_setting('max_unaligned_share', s.max_unaligned_share, 'in [0, 1)')
    if not s.oprd_coef >= 0:
        raise bad_setting('oprd_coef', s.oprd_coef, '>= 0')
    if not s.temperature >= 0:
        raise bad_setting('temperature', s.temperature, '>= 0')
    if not s.stop_step >= 0:
        raise bad_setting('stop_step', s.stop_step, '>= 0')
    if not s.bridge_rank >= 0:
        raise bad_setting('bridge_rank', s.bridge_rank, '>= 0')
    if not 0 <= s.warmup_frac < 1:
        raise bad_setting('warmup_frac', s.warmup_frac, 'in [0, 1)')
    if not 0 <= s.beta1 < 1:
        raise bad_setting('beta1', s.beta1, 'in [0, 1)')
    if not 0 <= s.beta2 < 1:
        raise bad_setting('beta2', s.beta2, 'in [0, 1)')
    if not 0 < s.top_p <= 1:
        raise bad_setting('top_p', s.top_p, 'in (0, 1]')
    if not 0 < s.gpu_memory_utilization <= 1:
        raise bad_setting('gpu_memory_utilization', s.gpu_memory_utilization, 'in (0, 1]')
    if not s.lr > 0:
        raise bad_setting('lr', s.lr, '> 0')
    if not s.bridge_lr > 0:
        raise bad_setting('bridge_lr', s.bridge_lr, '> 0')
    if not 0 <= s.min_lr <= s.lr:
        raise bad_setting('min_lr', s.min_lr, 'in [0, lr]')
    if s.top_k != -1 and s.top_k < 1:
        raise bad_setting('top_k', s.top_k, '-1 (off) or >= 1')
    if s.device == 'cuda' and not torch.cuda.is_available():
        raise DistillError("device='cuda' but torch sees no GPU: use device=cpu (or auto)")
    world = int(os.environ.get('WORLD_SIZE', 1))
    if not s.rollout_ranks >= 0:
        raise bad_setting('rollout_ranks', s.rollout_ranks, '>= 0')
    if s.rollout_ranks >= world:
        raise DistillError(f"rollout_ranks={s.rollout_ranks} leaves no rank to train: the world "
                           f"has {world} rank(s) (torchrun --nproc_per_node), and at least one "
                           "must train")
    if s.rollout_ranks and s.method in ('sft', 'bridge_fit'):
        raise DistillError(f"rollout_ranks={s.rollout_ranks} with method={s.method}: "
                           + ("it trains on reference solutions, with no sampler"
                              if s.method == 'sft' else
                              "stage 1 samples and fits on every rank; sampler ranks are for "
                              "training runs"))
    if s.rollout_ranks and s.rollout_ranks % s.tensor_parallel_size:
        raise DistillError(f"tensor_parallel_size={s.tensor_parallel_size} does not divide the "
                           f"{s.rollout_ranks} sampler ranks (rollout_ranks)")
    if not s.rollout_ranks and world % s.tensor_parallel_size:
        raise DistillError(f"tensor_parallel_size={s.tensor_parallel_size} does not divide the "
                           f"{world} ranks")
    if s.init_from == 'scratch' and not s.student:
        raise DistillError("no student checkpoint: set student=<HF folder or hub id>")
    if s.method != 'sft' and not s.teacher:
        raise DistillError(f"method={s.method} needs a teacher: set teacher=<HF folder or hub id>")
    if s.method in ('bridge_fit', *THROUGH_BRIDGE) and s.projector:
        raise DistillError(f"method={s.method} with projector=True: the bridge replaces the "
                           "projector")
    if s.method in ('bridge_fit', *THROUGH_BRIDGE) and not s.bridge_path:
        raise DistillError(f"method={s.method} needs bridge_path=<folder of the bridge>")
    used = []
    if checkpoints_in(s.out_dir):
        used.append('step_*')
    if os.path.exists(os.path.join(s.out_dir, 'log.jsonl')):
        used.append('log.jsonl')
    # stage 1 writes bridge_path, not out_dir
    if s.init_from == 'scratch' and used and s.method != 'bridge_fit':
        raise DistillError(f"out_dir {s.out_dir!r} holds another run ({' and '.join(used)}): "
                           "continue it with --init_from=resume, or choose another --out_dir")
    if s.init_from == 'resume' and not checkpoints_in(s.out_dir):
        raise DistillError(f"init_from='resume' but {s.out_dir!r} has no step_* checkpoint")


def check_resume(saved, cfg, world, stu_cfg, tea_cfg):
    """A resumed run must be the same experiment: refuse another method, layer or position set,
    teacher, number of training ranks (world), of sampler ranks or lag; print any other setting
    that changed."""
    out_dir = cfg['out_dir']
    now = dict(cfg, world=world, student_arch=arch(stu_cfg),
               teacher_arch=arch(tea_cfg) if tea_cfg else None)
    then = dict(saved['config'], world=saved.get('world'), student_arch=saved.get('student_arch'),
                teacher_arch=saved.get('teacher_arch'))
    # runs saved before off_policy_steps and rollout_ranks existed sampled on-policy, on every rank
    then.setdefault('off_policy_steps', 0)
    then.setdefault('rollout_ranks', 0)
    for k in ('method', 'layers', 'positions', 'world', 'student_arch', 'teacher_arch',
              'off_policy_steps', 'rollout_ranks'):
        if then.get(k) != now[k]:
            raise DistillError(f"cannot resume {out_dir!r} with {k}={now[k]!r}: the run was "
                               f"started with {then.get(k)!r} (continue it as it was, or start "
                               "another out_dir)")
    changed = [f"{k} {then[k]!r} -> {now[k]!r}" for k in now
               if k in then and then[k] != now[k] and k != 'init_from']
    if changed and dist.get_rank() == 0:
        print(f"resuming with changed settings: {', '.join(changed)}")
