"""
What a rank loads and checks before any work (distill.py): the student and the teacher, their
tokenizers, the training prompts, the loss plan, what spans two widths, and this rank's sampler.
Each function reads the run's settings from cfg, the dict configurator.configure returns (the keys
and defaults are distill.py's); a problem is one DistillError, raised before out_dir is made.

    loaded = start(cfg, dev, resume_path, state, roles)
    proj, bridge, bridge_meta = width_maps(cfg, loaded.plan, loaded.student, loaded.teacher, dev)
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

import align as align_tokens
import data
from batch import DistillError, Tokenizers
from bridge import check_bridge, load_bridge
from checks import ONE_VOCABULARY, THROUGH_BRIDGE, check_resume
from losses import Plan, make_plan
from model import CheckpointError, Transformer, resolve_checkpoint
from tokenizer import load_tokenizer, same_tokenization

# every sampler make_engine started, for close_samplers
started_samplers = []


@dataclass
class Loaded:
    """What start() loads on a rank that trains."""
    student: Transformer              # fp32 master weights, not yet sharded
    teacher: Transformer | None       # frozen, in the compute dtype; None under sft
    tokenizers: Tokenizers
    plan: Plan                        # which losses read which layers and positions
    items: list                       # the training prompts (load_prompts)
    sampler: object | None            # rollout.make_sampler's; None under sft or with sampler ranks
    student_path: str                 # the local folder the student came from
    teacher_path: str                 # the teacher's (under sft: the setting, as given)


def load_models(cfg, student_path, dev):
    """The student (fp32 master weights) and the frozen teacher (compute dtype; None under sft),
    with their local folders and load_tokenizers' pair."""
    compute_dtype = torch.bfloat16 if dev.type == 'cuda' else torch.float32
    try:
        # a hub id is downloaded once, then used as a folder
        student_path = resolve_checkpoint(student_path)
        stu = Transformer.from_pretrained(student_path, dtype=torch.float32, device=dev)
        tea, teacher_path = None, cfg['teacher']
        if cfg['method'] != 'sft':
            teacher_path = resolve_checkpoint(teacher_path)
            tea = Transformer.from_pretrained(teacher_path, dtype=compute_dtype, device=dev).eval()
            tea.requires_grad_(False)
    except CheckpointError as e:
        raise DistillError(str(e)) from None
    tokenizers = load_tokenizers(cfg, student_path, teacher_path if tea is not None else None)
    return stu, tea, tokenizers, student_path, teacher_path


def load_tokenizers(cfg, student_path, teacher_path):
    """The student's tokenizer, and the teacher's when it tokenizes differently (else None): then
    each rollout reaches the teacher as its own encoding of the same text (align.py). teacher_path
    None: no teacher (sft)."""
    method = cfg['method']
    tok = load_tokenizer(student_path)
    t_tok = load_tokenizer(teacher_path) if teacher_path is not None else None
    if t_tok is None or same_tokenization(tok, t_tok):
        return Tokenizers(tok, None)
    if method in ONE_VOCABULARY:
        raise DistillError(f"method={method} compares the two models' next-token distributions "
                           f"over one vocabulary, but teacher {cfg['teacher']!r} tokenizes "
                           "differently from the student: across tokenizers use opd_chunk "
                           "(chunk-level OPD), oprd, oprd_bridge or their sums")
    try:
        align_tokens.check_tokenizers(tok, t_tok)
    except ValueError as e:
        raise DistillError(str(e)) from None
    return Tokenizers(tok, t_tok)


def width_maps(cfg, plan, stu, tea, dev, rank=None):
    """What spans two widths: (the learned projector, the frozen bridge, its metadata), each None
    when unused. rank: method=bridge_fit's bridge_rank, checked against the widths."""
    if tea is None:
        return None, None, None
    method, bridge_path = cfg['method'], cfg['bridge_path']
    d_s, d_t = stu.config.hidden_size, tea.config.hidden_size
    if method == 'bridge_fit' and rank > min(d_s, d_t):
        raise DistillError(f"bridge_rank={rank} is above the width: it must be "
                           f"1..{min(d_s, d_t)} (student width {d_s}, teacher width {d_t})")
    if method in THROUGH_BRIDGE:
        bridge, meta = load_bridge(bridge_path)
        check_bridge(meta, bridge_path, plan, stu.config, tea.config)
        return None, bridge.to(dev), meta
    if plan.out_kind and stu.config.vocab_size != tea.config.vocab_size and dist.get_rank() == 0:
        print(f"vocabularies differ ({stu.config.vocab_size} vs {tea.config.vocab_size}): "
              f"comparing the common prefix of {plan.vocab}")
    if plan.s_layers and d_s != d_t and method != 'bridge_fit':
        if not cfg['projector']:
            raise DistillError(f"teacher width {d_t} != student width {d_s}: set projector=True, "
                               "or fit a bridge (method=bridge_fit) and use method=oprd_bridge")
        proj = nn.ModuleDict({str(l): nn.Linear(d_s, d_t, bias=False) for l in plan.s_layers})
        return proj.to(dev), None, None
    return None, None, None


def load_prompts(cfg, tok):
    """The training prompts as token ids (the paper's prompt through the chat template), too-long
    ones dropped; under sft each with its reference solution as the response."""
    prompts, max_prompt_len = cfg['prompts'], cfg['max_prompt_len']
    items = []
    for p in data.load_problems(prompts, cfg['data_dir'] or None):
        ids = data.encode_prompt(p, tok, cfg['enable_thinking'])
        if len(ids) > max_prompt_len:
            continue
        item = {'id': p['id'], 'prompt': ids, 'messages': data.build_prompt(p)}
        if cfg['method'] == 'sft':
            if not p.get('solution'):
                raise DistillError(f"method=sft needs reference solutions; {prompts!r} has none "
                                   f"for {p['id']!r}")
            item['response'] = tok.encode(p['solution']) + tok.eos_ids[:1]
        items.append(item)
    if not items:
        raise DistillError(f"no prompt of {prompts!r} fits max_prompt_len={max_prompt_len}")
    return items


def start(cfg, dev, resume_path, state, roles):
    """Everything both stages need on a rank that trains, checked before the sampler starts or
    out_dir is made: the models, the tokenizers, the plan, the prompts; then the sampler of the
    student's rollouts (None under sft, or when sampler ranks draw them)."""
    method = cfg['method']
    stu, tea, tokenizers, student_path, teacher_path = load_models(
        cfg, resume_path or cfg['student'], dev)
    tea_config = tea.config if tea is not None else None
    importance_cap = cfg['importance_cap'] if cfg['off_policy_steps'] else 0.0
    plan = make_plan(method, stu.config, tea_config, cfg['layers'], cfg['positions'],
                     cfg['k_positions'], cfg['align'], cfg['distance'], cfg['oprd_coef'],
                     cfg['mu'], cfg['topk'], cfg['vocab_chunk_tokens'], importance_cap)
    if state is not None:
        check_resume(state, cfg, roles.n_trainers, stu.config, tea_config)
    items = load_prompts(cfg, tokenizers.student)
    sampler = None
    if method != 'sft' and not roles.n_samplers:
        sampler = make_engine(cfg, student_path, dev, tokenizers.student.vocab_size,
                              dev.type == 'cuda' and method != 'bridge_fit')
    return Loaded(stu, tea, tokenizers, plan, items, sampler, student_path, teacher_path)


def make_engine(cfg, student_path, dev, n_tokens, sleeps, dp_rank=None):
    """The sampler of the student's rollouts on this rank (rollout.make_sampler): asleep through
    each update when sleeps (colocated on a GPU); dp_rank: a sampler rank's index among them."""
    import rollout
    # max_num_seqs, like the other vLLM-only options, reaches only a vLLM engine: make_sampler
    # leaves it out for the torch backend. enforce_eager on a CPU: vLLM's CPU build compiles the
    # model at every start, ~30 s for nothing
    sampler = rollout.make_sampler(
        cfg['backend'], student_path, gpu_memory_utilization=cfg['gpu_memory_utilization'],
        device=dev, tensor_parallel_size=cfg['tensor_parallel_size'], seed=cfg['seed'],
        max_model_len=cfg['max_prompt_len'] + cfg['max_new_tokens'],
        max_num_seqs=cfg['max_num_seqs'], enable_sleep_mode=sleeps,
        enforce_eager=dev.type == 'cpu', n_tokens=n_tokens, dp_rank=dp_rank,
        own_world=dp_rank is not None)
    started_samplers.append(sampler)
    return sampler


def close_samplers():
    """Every sampler make_engine started, closed (distill.main(), before the process group
    goes)."""
    while started_samplers:
        started_samplers.pop().close()
