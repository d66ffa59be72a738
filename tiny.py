"""
The embedded default: OPRD end to end on a CPU in minutes, on the built-in tiny task (data.py: 'tiny').

$ python tiny.py                  # make the teacher and the student (or reuse them: below), distil the student
                                  # with OPRD through vLLM rollouts, evaluate all three on the held-out problems
$ python tiny.py --verbose=True   # the same with the scripts' whole output (every step, vLLM's start-up log)
$ python tiny.py --tune=True      # the validation runs that chose the pair and config/tiny.py's learning rate
$ python tiny.py --xtok=True      # the teacher of another family and tokenizer (a Llama with a BPE tokenizer
                                  # trained on the task's text), made and evaluated beside the pair

The small-scale study (python -m lab.study) trains from the models made here, through the same runner (run_script)
and the same evaluation (accuracy).

The pair is a function of the code: the settings that made it (shapes, init seed, the SFT run's resolved
settings and data, the checkpoints kept) are written beside it (work_dir/pair.json), and a pair made by other
settings is remade, with one line saying what changed. Everything runs through the project's own scripts as
subprocesses (distill.py for SFT and distillation, eval.py for accuracy), so what this prints is what a user of
those scripts gets; their whole output goes to work_dir/*.log.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque

# -----------------------------------------------------------------------------
work_dir = 'tiny'             # models, runs and evaluations go here
tune = False                  # the validation runs behind the pair and config/tiny.py instead of the quick start
xtok = False                  # make and evaluate the cross-tokenizer teacher instead of the quick start
verbose = False               # print the scripts' whole output, not only their own lines (the logs have it all)
student_step = 500            # the student: this checkpoint of the SFT run that makes the pair (config/tiny_sft.py)
teacher_step = 1000           # the teacher: this one (both chosen on the validation split: tiny.py --tune=True)
distill_steps = 60            # equal step budget for every method (here and in lab/study.py)
tune_lrs = '1e-3,2e-3,3e-3'   # OPRD learning rates that --tune=True compares on the validation split
eval_backend = 'torch'        # greedy evaluation of 256 short answers: the torch sampler, no engine to start
# -----------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.abspath(__file__))
SFT_CONFIG = 'config/tiny_sft.py'
# the tiny Qwen3-architecture models: head_dim 32 so that vLLM's CPU attention serves them
SHAPES = {'student': dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=384),
          # the smaller student of another width and depth, for the projector and Bridge paths
          'small': dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=192),
          # the teacher across tokenizers: another family, width and tokenizer (head_dim 64, a BPE of BPE_VOCAB tokens)
          'xteacher': dict(model_type='llama', tokenizer='bpe', hidden_size=192, num_hidden_layers=4,
                           num_attention_heads=3, num_key_value_heads=1, intermediate_size=512)}
BPE_VOCAB = 300  # 40 merges: operators, '=' and newlines join the digit after them ('+4', '=12', '\n\\boxed{1'); at 512
                 # whole numbers merge ('+48') and the same Llama reached 3% of the task in the same 1000 SFT steps
# its SFT run: config/tiny_sft.py at a lower rate, for longer. Measured: 1000 steps at 3e-3 reached 6%, at 1e-3 39%
XTEACHER_STEPS = 3000
BPE_SPECIALS = ('<|pad|>', '<|user|>', '<|assistant|>', '<|end|>')
BPE_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# eval.py's settings for the tiny task: one greedy answer per problem
EVAL_ARGS = ('--n_samples=1', '--temperature=0.0', '--top_p=1.0', '--max_new_tokens=64', '--max_prompt_tokens=64')
# distill.py settings that cannot change the weights an SFT run makes: left out of the recorded recipe
NOT_RECIPE = ('out_dir', 'student', 'log_every', 'save_every', 'keep_checkpoints', 'wandb_log', 'wandb_project',
              'dist_timeout_min')
# what the scripts' dependencies print while they start (vLLM's log, python and torch warnings, progress bars)
CHATTER = re.compile(r"^\([\w-]+ pid=\d+\) |^(INFO|WARNING|DEBUG|ERROR) \d\d-\d\d |^(\[rank\d+\]:)?\[W\d{4} |"
                     r"^\S+:\d+: \w*Warning: |"
                     r"^Triton |^Loading safetensors|it/s\]|s/it\]|^\s*$")


def run_script(args, log, every=1, echo=True, threads=None):
    """Run one of the project's scripts (offline: the tiny task needs nothing from the hub), its whole output to
    the log file; `threads` sets its OMP_NUM_THREADS. With echo (the quick start): the command, then its own
    lines without the config echo and its dependencies' chatter, and of its step lines the first, every
    `every`-th and the last (all of it with verbose). Without (lab/study.py's parallel runs): nothing. If it fails,
    the log's last lines and one error line naming the log."""
    if echo:
        print('$ ' + ' '.join(['python'] + args) + f'    (log: {log})', flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    tail, pending, warned = deque(maxlen=30), None, False
    with open(log, 'w') as f:
        p = subprocess.Popen([sys.executable] + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env)
        for line in p.stdout:
            f.write(line)
            tail.append(line)
            if not echo:
                continue
            step = re.match(r'step (\d+):', line)
            if step:
                show = step[1] == '0' or (int(step[1]) + 1) % every == 0
            else:  # python prints a warning's source line after it: skipped with it
                show = not (warned or line.startswith('config:') or CHATTER.search(line)
                            or (every > 1 and line.startswith('saved ')))
                warned = bool(re.match(r'\S+:\d+: \w*Warning: ', line))
            if verbose or show:  # the last step line, if not shown, comes before the next line that is
                print(('' if step else pending or '') + '  ' + line, end='', flush=True)
                pending = None
            elif step:
                pending = '  ' + line
        if p.wait() != 0:
            if not (echo and verbose):
                print(''.join('  | ' + line for line in tail), end='', flush=True)
            raise SystemExit(f"error: {args[0]} failed (exit {p.returncode}); its whole output is in {log}")


def make_bpe_tokenizer(path):
    """A byte-level BPE of BPE_VOCAB tokens trained on the tiny task's training text with no pre-split, so its
    merges cross digit, operator and newline boundaries ('=12' is one token, so a chunk both models read spans
    several of the byte student's tokens); its own chat template, whose turns end with <|end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    import data
    texts = [f"{data.build_prompt(p)}\n{p['solution']}" for p in data.load_problems('tiny_train')[:20000]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=list(BPE_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token='<|pad|>', eos_token='<|end|>')
    tok.chat_template = BPE_TEMPLATE
    tok.save_pretrained(path)
    return tok


def make_init(path, seed=0, model_type='qwen3', tokenizer='byte', **shape):
    """A randomly initialised tiny checkpoint: a Qwen3 that uses the built-in byte-level tokenizer, or (the
    teacher across tokenizers) a Llama with the BPE tokenizer of make_bpe_tokenizer."""
    import torch
    from model import ModelConfig, Transformer, to_hf_config
    from tokenizer import ByteTokenizer, load_tokenizer, mark_byte_tokenizer
    torch.manual_seed(seed)
    bpe = make_bpe_tokenizer(path) if tokenizer != 'byte' else None
    tok = ByteTokenizer() if bpe is None else load_tokenizer(path)
    head_dim = shape['hidden_size'] // shape['num_attention_heads']
    cfg = ModelConfig(model_type=model_type, vocab_size=tok.vocab_size, head_dim=head_dim, rope_theta=10000.0,
                      tie_word_embeddings=True, **shape)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
        elif 'norm' in name:
            torch.nn.init.ones_(p)
    model.hf_config = dict(to_hf_config(cfg), eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
    model.save_pretrained(path)  # a new folder: the tokenizer files go in after it
    mark_byte_tokenizer(path) if bpe is None else bpe.save_pretrained(path)


def recipe(shape, seed, steps, sft_args=()):
    """Everything that determines models made by make_models: the init (shape, seed, make_init's code), the SFT
    run's settings as distill.py resolves them, its data and tokenizer, the checkpoints kept, torch's version."""
    import inspect
    import torch
    import data
    import distill
    import tokenizer
    from configurator import apply_config, settings
    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()[:16]
    defaults = settings(vars(distill))  # distill.py's settings, as its main() reads them
    cwd = os.getcwd()
    os.chdir(ROOT)  # a config file may exec another by its path from the repository root
    try:
        sft = apply_config([SFT_CONFIG, *sft_args], defaults, verbose=False)
    finally:
        os.chdir(cwd)
    problems = data.load_problems(sft['prompts'])
    made_by = {'init': dict(shape, seed=seed, code=sha(inspect.getsource(make_init))),
               'sft': {k: v for k, v in sorted(sft.items()) if k not in NOT_RECIPE},
               'sft_data': sha(json.dumps([(data.build_prompt(p), p.get('solution')) for p in problems])),
               'tokenizer': sha(inspect.getsource(tokenizer.ByteTokenizer) if shape.get('tokenizer', 'byte') == 'byte'
                                else inspect.getsource(make_bpe_tokenizer) + repr((BPE_VOCAB, BPE_SPECIALS,
                                                                                    BPE_TEMPLATE))),
               'checkpoints': steps, 'torch': torch.__version__}
    return json.loads(json.dumps(made_by))  # as it reads back from the file (tuples become lists)


def changes(old, new, prefix=''):
    """'key old -> new' for every setting that differs between two recipes."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, '(none)'), new.get(k, '(none)')
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f'{prefix}{k}.')
        elif a != b:
            out.append(f'{prefix}{k} {a!r} -> {b!r}')
    return out


def make_models(name, shape, seed, steps, made_from=('runs', 'eval', 'bridges', 'study'), sft_args=()):
    """Models of one SFT run from a seeded random init: work_dir/<who> = its checkpoint at step steps[who].
    Reused only if work_dir/<name>.json records this very recipe; otherwise remade, saying why in one line, and
    every run and evaluation made from the old models (the folders made_from) removed."""
    record = os.path.join(work_dir, f'{name}.json')
    want = recipe(shape, seed, steps, sft_args)
    have = all(os.path.isfile(os.path.join(work_dir, who, 'config.json')) for who in steps)
    old = None
    if os.path.isfile(record):
        with open(record) as f:
            old = json.load(f)
    diff = changes(old, want) if old is not None else []
    if have and old is not None and not diff:
        print(f"{', '.join(steps)}: reused ({record} records this recipe: SFT checkpoints "
              f"{', '.join(f'{who} {s}' for who, s in steps.items())})", flush=True)
        return
    why = ("made by one SFT run" if not have else
           f"remade, no {record} records how they were made" if old is None else
           f"remade, the recipe changed since {record} ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''})")
    print(f"{', '.join(steps)}: {why}", flush=True)
    init, sft = os.path.join(work_dir, f'init_{name}'), os.path.join(work_dir, f'sft_{name}')
    for folder in [init, sft, *(os.path.join(work_dir, f) for f in [*steps, *made_from])]:
        shutil.rmtree(folder, ignore_errors=True)
    if os.path.exists(record):
        os.remove(record)
    make_init(init, seed=seed, **shape)
    run_script(['distill.py', SFT_CONFIG, *sft_args, f'--student={init}', f'--out_dir={sft}'],
               os.path.join(work_dir, f'sft_{name}.log'), every=100)
    from model import checkpoints_in
    for ckpt in checkpoints_in(sft):  # the finished run's checkpoints need no resume state
        os.remove(os.path.join(ckpt, 'resume.pt'))
    for who, step in steps.items():
        ckpt = os.path.join(sft, f'step_{step:07d}')
        if not os.path.isdir(ckpt):
            raise SystemExit(f"error: {SFT_CONFIG} kept no checkpoint at step {step} (see its save_every and "
                             "keep_checkpoints)")
        shutil.copytree(ckpt, os.path.join(work_dir, who))
    with open(record, 'w') as f:
        json.dump(want, f, indent=1)


def make_pair():
    make_models('pair', SHAPES['student'], 0, {'student': student_step, 'teacher': teacher_step},
                made_from=('runs', 'eval', 'bridges', 'study', 'xstudy'))  # xstudy: lab/study.py --xtok=True's runs


def make_small():
    """The smaller student (another width and depth): its own SFT run, 1000 steps."""
    make_models('small', SHAPES['small'], 1, {'small': 1000})


def make_xteacher():
    """The teacher across tokenizers: a Llama of another width with its BPE tokenizer, its own SFT run."""
    make_models('xtok', SHAPES['xteacher'], 2, {'xteacher': XTEACHER_STEPS}, made_from=('xruns', 'xeval', 'xstudy'),
                sft_args=('--lr=1e-3', '--min_lr=1e-4', f'--max_steps={XTEACHER_STEPS}'))


def write_val(path, n=512):
    """The validation split: tiny_train's generator continued past the problems training draws from, so it
    shares no prompt with training (checked) nor with the held-out test problems (checked); prompts exactly as
    the task's ("37+48-29=?"), which eval.py reads from the file's 'prompt' field."""
    import data
    train, test = data.BUILTIN['tiny_train'](), data.BUILTIN['tiny']()
    val = data.tiny_problems('train', len(train) + n)[len(train):]
    assert not {p['prompt'] for p in val} & {p['prompt'] for p in train + test}
    with open(path, 'w') as f:
        for i, p in enumerate(val):
            f.write(json.dumps({'id': f'val-{i}', 'problem': p['problem'], 'prompt': p['prompt'],
                                'answer': p['answer']}) + '\n')
    return path


def accuracy(ckpt, out, log, bench='tiny', reuse=False, echo=True, threads=None):
    """Greedy accuracy (avg@1) of a checkpoint through eval.py: on the held-out tiny benchmark (256 problems), or
    a .jsonl split. eval.py writes summary.json and every answer to `out`, its whole output to `log`. With reuse,
    an evaluation already finished in `out` is read back instead of run again (lab/study.py's reruns)."""
    summary = os.path.join(out, 'summary.json')
    if not (reuse and os.path.isfile(summary)):
        run_script(['eval.py', f'--ckpt={ckpt}', f'--benchmarks={bench}', *EVAL_ARGS, f'--backend={eval_backend}',
                    f'--out={out}'], log, echo=echo, threads=threads)
    with open(summary) as f:
        return json.load(f)[bench]['avg@1']


def eval_paths(name):
    """Where the quick start and --tune=True keep an evaluation (work_dir/eval/<name>) and its log."""
    return os.path.join(work_dir, 'eval', name), os.path.join(work_dir, f'eval_{name}.log')


def distill_run(method, seed, name, student='student', *extra, config='config/tiny.py'):
    """A fresh distill.py run from work_dir/<student> toward the teacher, distill_steps long; its last checkpoint."""
    out = os.path.join(work_dir, 'runs', name)
    shutil.rmtree(out, ignore_errors=True)
    run_script(['distill.py', config, f'--method={method}', f'--seed={seed}', f'--out_dir={out}',
                f'--student={work_dir}/{student}', f'--teacher={work_dir}/teacher', f'--max_steps={distill_steps}',
                *extra], os.path.join(work_dir, f'{name}.log'), every=10)
    from model import checkpoints_in
    return checkpoints_in(out)[-1]


def quick_start():
    t0 = time.time()
    make_pair()
    t_pair = time.time() - t0
    before = accuracy(f'{work_dir}/student', *eval_paths('student'))
    teacher = accuracy(f'{work_dir}/teacher', *eval_paths('teacher'))
    after = accuracy(distill_run('oprd', 0, 'oprd_seed0'), *eval_paths('oprd_seed0'))
    gap = (after - before) / max(teacher - before, 1e-9)
    wall = time.time() - t0
    print("\ntiny task, greedy accuracy on 256 held-out problems:")
    print(f"  student before   {100 * before:5.1f}%")
    print(f"  teacher          {100 * teacher:5.1f}%")
    print(f"  student + OPRD   {100 * after:5.1f}%   ({100 * gap:.0f}% of the teacher-student gap closed "
          f"in {distill_steps} steps)")
    print(f"{wall / 60:.1f} minutes in all, {t_pair / 60:.1f} of them making the pair")


def tune_runs():
    """The numbers behind the settings, all on the validation split (never the held-out test problems): every
    kept checkpoint of the pair's SFT run, then OPRD from the student at each of tune_lrs; to work_dir/tune.md."""
    from model import checkpoints_in
    make_pair()
    val = write_val(os.path.join(work_dir, 'val.jsonl'))
    lines = [f"Greedy accuracy on the validation split ({val}, 512 problems); gap closed = (after - before) / "
             "(teacher - before).", "", "| model | accuracy (%) | gap closed |", "|---|---|---|"]
    acc = {}
    for ckpt in checkpoints_in(os.path.join(work_dir, 'sft_pair')):
        step = int(ckpt.rsplit('_', 1)[1])
        acc[step] = accuracy(ckpt, *eval_paths(f'val_sft_{step}'), bench=val)
        who = {student_step: ' (the student)', teacher_step: ' (the teacher)'}.get(step, '')
        lines.append(f"| SFT step {step}{who} | {100 * acc[step]:.1f} | |")
    before, teacher = acc[student_step], acc[teacher_step]
    for lr in tune_lrs.split(','):
        run = f'val_oprd_lr{lr}'
        after = accuracy(distill_run('oprd', 0, run, 'student', f'--lr={lr}'), *eval_paths(run), bench=val)
        lines.append(f"| student + OPRD, {distill_steps} steps at lr {lr} | {100 * after:.1f} | "
                     f"{100 * (after - before) / max(teacher - before, 1e-9):.0f}% |")
    text = '\n'.join(lines)
    print(text)
    with open(os.path.join(work_dir, 'tune.md'), 'w') as f:
        f.write(text + '\n')


def xtok_teacher():
    """Make the teacher across tokenizers and print its greedy accuracy on the held-out problems."""
    from tokenizer import load_tokenizer
    t0 = time.time()
    make_xteacher()
    tok, text = load_tokenizer(f'{work_dir}/xteacher'), '37+48=85'
    acc = accuracy(f'{work_dir}/xteacher', *eval_paths('xteacher'))
    print(f"\nteacher across tokenizers (llama, d = {SHAPES['xteacher']['hidden_size']}, BPE of {BPE_VOCAB} tokens: "
          f"{text!r} -> {[tok.decode([i]) for i in tok.encode(text)]}): greedy accuracy {100 * acc:.1f}% on 256 "
          f"held-out problems\n{(time.time() - t0) / 60:.1f} minutes")


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), __file__)
    os.makedirs(work_dir, exist_ok=True)
    tune_runs() if tune else xtok_teacher() if xtok else quick_start()
