"""
The embedded default: OPRD end to end on a CPU in minutes, on the built-in tiny task (data.py's
'tiny').

$ python tiny.py                 # distil the shipped student toward the shipped teacher with OPRD
                                 # through vLLM rollouts, evaluate all three on held-out problems
$ python tiny.py --verbose=True  # the same with the scripts' whole output (every step, vLLM's log)
$ python tiny.py --remake=True   # first remake the shipped models by their recipe, in models/tiny/
$ python tiny.py --tune=True     # the validation runs that chose the pair and config/tiny.py's rate
$ python tiny.py --xtok=True     # the teacher of another family and tokenizer (a Llama with a BPE
                                 # trained on the task's text), made by its recipe and evaluated

The models ship in models/tiny/ as HF safetensors checkpoints: the teacher and the student
(pair.json records the recipe that made them) and the smaller student of another width and depth
(small.json). They ship because their 1000 SFT steps amplify the rounding of the CPU's kernels: a
pair made on one kind of CPU differs from one made on another, and so would every figure printed
from it. Shipped, the quick start prints the same figures on every machine. A recipe is the settings
that made the models (shapes, init seed, the SFT run's resolved settings and data, the checkpoints
kept, torch's version); when the code's recipe differs from the recorded one, a note says what
changed, and the shipped models are still used.

--remake=True runs the recipe on this machine: the SFT run goes to work_dir/, its checkpoints are
written over models/tiny/ (git then shows them as changed) with the record beside them, and every
run and evaluation made from the old models in work_dir/ is removed. --tune=True reads every kept
checkpoint of that SFT run, so it remakes the pair first unless work_dir/ holds the run of this very
recipe. The cross-tokenizer teacher is not shipped: --xtok=True makes it by its recipe in work_dir/
(reused while work_dir/xtok.json records the same).

The small-scale study (python -m lab.study) trains from these models through the same runner
(run_script) and the same evaluation (accuracy). Everything runs through the project's own scripts
as subprocesses (distill.py for SFT and distillation, eval.py for accuracy), so what this prints is
what a user of those scripts gets; their whole output goes to work_dir/*.log.
"""
import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

# -----------------------------------------------------------------------------
work_dir = 'tiny'             # runs, evaluations, logs and remade SFT runs go here
remake = False                # remake the shipped models by their recipe (over models/tiny/) first
tune = False                  # the validation runs behind the pair and config/tiny.py instead
xtok = False                  # make and evaluate the cross-tokenizer teacher instead
verbose = False               # print the scripts' whole output, not only their own lines
student_step = 500            # the student: this checkpoint of the SFT run that makes the pair
teacher_step = 1000           # the teacher: this one (both chosen on validation: --tune=True)
distill_steps = 60            # equal step budget for every method (here and in lab/study.py)
tune_lrs = '1e-3,2e-3,3e-3'   # OPRD learning rates that --tune=True compares on validation
eval_backend = 'torch'        # greedy evaluation of 256 short answers: the torch sampler
# -----------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.abspath(__file__))
# the shipped models
MODELS = os.path.join(ROOT, 'models', 'tiny')
SFT_CONFIG = 'config/tiny_sft.py'
SMALL_STEPS = 1000
# the tiny Qwen3-architecture models: head_dim 32 so that vLLM's CPU attention serves them
SHAPES = {
    'student': dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=384),
    # the smaller student of another width and depth, for the projector and Bridge paths
    'small': dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=192),
    # the teacher across tokenizers: another family, width and tokenizer (head_dim 64, a BPE of
    # BPE_VOCAB tokens)
    'xteacher': dict(model_type='llama', tokenizer='bpe', hidden_size=192, num_hidden_layers=4,
                     num_attention_heads=3, num_key_value_heads=1, intermediate_size=512),
}
# 40 merges: operators, '=' and newlines join the digit after them ('+4', '=12', '\n\\boxed{1'). At
# 512 whole numbers merge ('+48') and the same Llama reached 3% of the task in the same 1000 SFT
# steps.
BPE_VOCAB = 300
# The cross-tokenizer teacher's SFT run: config/tiny_sft.py at a lower rate, for longer. Measured:
# 1000 steps at 3e-3 reached 6%, at 1e-3 39%.
XTEACHER_STEPS = 3000
BPE_SPECIALS = ('<|pad|>', '<|user|>', '<|assistant|>', '<|end|>')
BPE_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# eval.py's settings for the tiny task: one greedy answer per problem
EVAL_ARGS = ('--n_samples=1', '--temperature=0.0', '--top_p=1.0', '--max_new_tokens=64',
             '--max_prompt_tokens=64')
# distill.py settings that cannot change the weights an SFT run makes: left out of the recorded
# recipe
NOT_RECIPE = ('out_dir', 'student', 'log_every', 'save_every', 'keep_checkpoints', 'wandb_log',
              'wandb_project', 'dist_timeout_min')
# what the scripts' dependencies print while they start (vLLM's log, python and torch warnings,
# progress bars)
CHATTER = re.compile(r"^\([\w-]+ pid=\d+\) |^(INFO|WARNING|DEBUG|ERROR) \d\d-\d\d |"
                     r"^(\[rank\d+\]:)?\[W\d{4} |"
                     r"^\S+:\d+: \w*Warning: |"
                     r"^Triton |^Loading safetensors|it/s\]|s/it\]|^\s*$")
WARNING_LINE = re.compile(r'\S+:\d+: \w*Warning: ')


def run_script(args, log, every=1, echo=True, threads=None):
    """Run one of the project's scripts (offline: the tiny task needs nothing from the hub), its
    whole output to the log file; `threads` sets its OMP_NUM_THREADS. With echo (the quick start):
    the command, then its own lines without the config echo and its dependencies' chatter, and of
    its step lines the first, every `every`-th and the last (all of it with verbose). Without
    (lab/study.py's parallel runs): nothing. If it fails, the log's last lines and one error line
    naming the log."""
    if echo:
        print('$ ' + ' '.join(['python'] + args) + f'    (log: {log})', flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    tail = deque(maxlen=30)
    # a step line not shown yet: shown before the next line that is, so the last step always shows
    pending_step = None
    # python prints a warning's source line after it: skipped with it
    after_warning = False
    with open(log, 'w') as f:
        process = subprocess.Popen([sys.executable] + args, cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=env)
        for line in process.stdout:
            f.write(line)
            tail.append(line)
            if not echo:
                continue
            step = re.match(r'step (\d+):', line)
            if step:
                show = step[1] == '0' or (int(step[1]) + 1) % every == 0
            else:
                show = not (after_warning or line.startswith('config:') or CHATTER.search(line)
                            or (every > 1 and line.startswith('saved ')))
                after_warning = bool(WARNING_LINE.match(line))
            if verbose or show:
                if pending_step and not step:
                    print(pending_step, end='')
                print('  ' + line, end='', flush=True)
                pending_step = None
            elif step:
                pending_step = '  ' + line
        if process.wait() != 0:
            if not (echo and verbose):
                print(''.join('  | ' + line for line in tail), end='', flush=True)
            raise SystemExit(f"error: {args[0]} failed (exit {process.returncode}); "
                             f"its whole output is in {log}")


def make_bpe_tokenizer(path):
    """A byte-level BPE of BPE_VOCAB tokens trained on the tiny task's training text with no
    pre-split, so its merges cross digit, operator and newline boundaries ('=12' is one token, so a
    chunk both models read spans several of the byte student's tokens); its own chat template, whose
    turns end with <|end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    import data
    problems = data.load_problems('tiny_train')[:20000]
    texts = [f"{data.build_prompt(p)}\n{p['solution']}" for p in problems]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=list(BPE_SPECIALS),
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token='<|pad|>', eos_token='<|end|>')
    tok.chat_template = BPE_TEMPLATE
    tok.save_pretrained(path)
    return tok


def make_init(path, seed=0, model_type='qwen3', tokenizer='byte', **shape):
    """A randomly initialised tiny checkpoint: a Qwen3 that uses the built-in byte-level tokenizer,
    or (the teacher across tokenizers) a Llama with the BPE tokenizer of make_bpe_tokenizer."""
    import torch
    from model import ModelConfig, Transformer, to_hf_config
    from tokenizer import ByteTokenizer, load_tokenizer, mark_byte_tokenizer
    torch.manual_seed(seed)
    bpe = None
    if tokenizer != 'byte':
        bpe = make_bpe_tokenizer(path)
    if bpe is None:
        tok = ByteTokenizer()
    else:
        tok = load_tokenizer(path)
    head_dim = shape['hidden_size'] // shape['num_attention_heads']
    cfg = ModelConfig(model_type=model_type, vocab_size=tok.vocab_size, head_dim=head_dim,
                      rope_theta=10000.0, tie_word_embeddings=True, **shape)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
        elif 'norm' in name:
            torch.nn.init.ones_(p)
    model.hf_config = dict(to_hf_config(cfg), eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
    # a new folder: the tokenizer files go in after it
    model.save_pretrained(path)
    if bpe is None:
        mark_byte_tokenizer(path)
    else:
        bpe.save_pretrained(path)


def short_hash(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recipe(shape, seed, steps, sft_args=()):
    """Everything that determines models made by make_models: the init (shape, seed, make_init's
    code), the SFT run's settings as distill.py resolves them, its data and tokenizer, the
    checkpoints kept, torch's version."""
    import torch
    import data
    import distill
    import tokenizer
    from configurator import apply_config, settings
    # distill.py's settings, as its main() reads them
    defaults = settings(vars(distill))
    cwd = os.getcwd()
    # a config file may exec another by its path from the repository root
    os.chdir(ROOT)
    try:
        sft = apply_config([SFT_CONFIG, *sft_args], defaults, verbose=False)
    finally:
        os.chdir(cwd)
    problems = data.load_problems(sft['prompts'])
    sft_data = json.dumps([(data.build_prompt(p), p.get('solution')) for p in problems])
    if shape.get('tokenizer', 'byte') == 'byte':
        tokenizer_code = inspect.getsource(tokenizer.ByteTokenizer)
    else:
        tokenizer_code = (inspect.getsource(make_bpe_tokenizer)
                          + repr((BPE_VOCAB, BPE_SPECIALS, BPE_TEMPLATE)))
    made_by = {'init': dict(shape, seed=seed, code=short_hash(inspect.getsource(make_init))),
               'sft': {k: v for k, v in sorted(sft.items()) if k not in NOT_RECIPE},
               'sft_data': short_hash(sft_data),
               'tokenizer': short_hash(tokenizer_code),
               'checkpoints': steps,
               'torch': torch.__version__}
    # as it reads back from the file (tuples become lists)
    return json.loads(json.dumps(made_by))


def changes(old, new, prefix=''):
    """'key old -> new' for every setting that differs between two recipes."""
    out = []
    for k in sorted(set(old) | set(new)):
        a = old.get(k, '(none)')
        b = new.get(k, '(none)')
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f'{prefix}{k}.')
        elif a != b:
            out.append(f'{prefix}{k} {a!r} -> {b!r}')
    return out


def summary_of(diff):
    """The first three changes of a recipe, in one line."""
    return '; '.join(diff[:3]) + ('; ...' if len(diff) > 3 else '')


@dataclass(frozen=True)
class Models:
    """The models of one SFT run from a seeded random init, and where they live."""
    # the record's name: <folder>/<name>.json; the SFT run is work_dir/sft_<name>
    name: str
    shape: dict
    seed: int
    # {who: the SFT step whose checkpoint it is}
    steps: dict
    # models.MODELS (shipped) or the work_dir (made by recipe, as the cross-tokenizer teacher)
    folder: str
    sft_args: tuple = ()
    # the work_dir folders of runs and evaluations made from these models: removed when they change
    made_from: tuple = field(default=('runs', 'eval', 'bridges', 'study'))

    def recipe(self):
        return recipe(self.shape, self.seed, self.steps, self.sft_args)

    def record(self):
        return os.path.join(self.folder, f'{self.name}.json')


def pair_models():
    """The teacher and the student: two checkpoints of one SFT run. xstudy holds lab/study.py
    --xtok=True's runs, made from this student."""
    steps = {'student': student_step, 'teacher': teacher_step}
    return Models('pair', SHAPES['student'], 0, steps, MODELS,
                  made_from=('runs', 'eval', 'bridges', 'study', 'xstudy'))


def small_models():
    """The smaller student (another width and depth): its own SFT run."""
    return Models('small', SHAPES['small'], 1, {'small': SMALL_STEPS}, MODELS)


def xteacher_models():
    """The teacher across tokenizers: a Llama of another width with its BPE tokenizer, its own SFT
    run."""
    sft_args = ('--lr=1e-3', '--min_lr=1e-4', f'--max_steps={XTEACHER_STEPS}')
    return Models('xtok', SHAPES['xteacher'], 2, {'xteacher': XTEACHER_STEPS}, work_dir, sft_args,
                  made_from=('xruns', 'xeval', 'xstudy'))


def from_root(path):
    """A path as it reads from the repository root, where the scripts run: shorter in their
    commands."""
    if path.startswith(ROOT + os.sep):
        return os.path.relpath(path, ROOT)
    return path


def model_path(who):
    """Where a model is, as the scripts read it: the shipped ones in MODELS, the cross-tokenizer
    teacher in work_dir."""
    if who == 'xteacher':
        return os.path.join(work_dir, who)
    return from_root(os.path.join(MODELS, who))


def read_record(path):
    """A recorded recipe, or None where there is none."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def have_models(models):
    return all(os.path.isfile(os.path.join(models.folder, who, 'config.json'))
               for who in models.steps)


def check_shipped(models):
    """The shipped models, as they are: an error if any is missing, a one-line note if the code's
    recipe differs from the recorded one (they are used all the same; --remake=True makes them
    anew)."""
    for who in models.steps:
        for name in ('config.json', 'model.safetensors'):
            path = os.path.join(models.folder, who, name)
            if not os.path.isfile(path):
                raise SystemExit(f"error: {from_root(path)} is missing: restore it from git, "
                                 "or make it with python tiny.py --remake=True")
    old = read_record(models.record())
    if old is None:
        print(f"note: {from_root(models.record())} is missing: how the shipped "
              f"{', '.join(models.steps)} were made is not recorded", flush=True)
        return
    diff = changes(old, models.recipe())
    if diff:
        print(f"note: the shipped {', '.join(models.steps)} ({from_root(models.record())}) were "
              f"made by another recipe than this code's ({summary_of(diff)}); "
              "python tiny.py --remake=True makes them by this one", flush=True)


def make_models(models, reuse=False):
    """Run the recipe: a seeded random init, one SFT run (work_dir/sft_<name>), models.folder/<who>
    its checkpoint at step steps[who], the recipe recorded beside them. With reuse, models whose
    record holds this very recipe are kept. Every run and evaluation made from older models (the
    work_dir folders made_from) is removed; the line printed says why the models were made."""
    folder = models.folder
    record = models.record()
    shown = from_root(record)
    want = models.recipe()
    old = read_record(record)
    have = have_models(models)
    diff = changes(old, want) if old is not None else []
    names = ', '.join(models.steps)
    if reuse and have and old is not None and not diff:
        steps = ', '.join(f'{who} {step}' for who, step in models.steps.items())
        print(f"{names}: reused ({shown} records this recipe: SFT checkpoints {steps})",
              flush=True)
        return
    if not reuse:
        why = f"made by their recipe into {from_root(folder)}"
    elif not have:
        why = "made by one SFT run"
    elif old is None:
        why = f"remade, no {shown} records how they were made"
    else:
        why = f"remade, the recipe changed since {shown} ({summary_of(diff)})"
    print(f"{names}: {why}", flush=True)
    init = os.path.join(work_dir, f'init_{models.name}')
    sft = os.path.join(work_dir, f'sft_{models.name}')
    stale = [init, sft]
    stale += [os.path.join(folder, who) for who in models.steps]
    stale += [os.path.join(work_dir, made) for made in models.made_from]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(record):
        os.remove(record)
    make_init(init, seed=models.seed, **models.shape)
    run_script(['distill.py', SFT_CONFIG, *models.sft_args, f'--student={init}',
                f'--out_dir={sft}'],
               os.path.join(work_dir, f'sft_{models.name}.log'), every=100)
    from model import checkpoints_in
    # the finished run's checkpoints need no resume state
    for ckpt in checkpoints_in(sft):
        os.remove(os.path.join(ckpt, 'resume.pt'))
    for who, step in models.steps.items():
        ckpt = os.path.join(sft, f'step_{step:07d}')
        if not os.path.isdir(ckpt):
            raise SystemExit(f"error: {SFT_CONFIG} kept no checkpoint at step {step} "
                             "(see its save_every and keep_checkpoints)")
        shutil.copytree(ckpt, os.path.join(folder, who))
    # the record of the SFT run in work_dir, so --tune=True knows whose checkpoints these are
    for path in (record, os.path.join(work_dir, f'sft_{models.name}.json')):
        with open(path, 'w') as f:
            json.dump(want, f, indent=1)


def make_pair():
    make_models(pair_models())


def make_small():
    make_models(small_models())


def make_xteacher():
    make_models(xteacher_models(), reuse=True)


def write_val(path, n=512):
    """The validation split: tiny_train's generator continued past the problems training draws from,
    so it shares no prompt with training (checked) nor with the held-out test problems (checked);
    prompts exactly as the task's ("37+48-29=?"), which eval.py reads from the file's 'prompt'
    field."""
    import data
    train = data.BUILTIN['tiny_train']()
    test = data.BUILTIN['tiny']()
    val = data.tiny_problems('train', len(train) + n)[len(train):]
    assert not {p['prompt'] for p in val} & {p['prompt'] for p in train + test}
    with open(path, 'w') as f:
        for i, p in enumerate(val):
            row = {'id': f'val-{i}', 'problem': p['problem'], 'prompt': p['prompt'],
                   'answer': p['answer']}
            f.write(json.dumps(row) + '\n')
    return path


def accuracy(ckpt, out, log, bench='tiny', reuse=False, echo=True, threads=None):
    """Greedy accuracy (avg@1) of a checkpoint through eval.py: on the held-out tiny benchmark (256
    problems), or a .jsonl split. eval.py writes summary.json and every answer to `out`, its whole
    output to `log`. With reuse, an evaluation already finished in `out` is read back instead of run
    again (lab/study.py's reruns)."""
    summary = os.path.join(out, 'summary.json')
    if not (reuse and os.path.isfile(summary)):
        run_script(['eval.py', f'--ckpt={ckpt}', f'--benchmarks={bench}', *EVAL_ARGS,
                    f'--backend={eval_backend}', f'--out={out}'], log, echo=echo, threads=threads)
    with open(summary) as f:
        return json.load(f)[bench]['avg@1']


def eval_paths(name):
    """Where the quick start and --tune=True keep an evaluation (work_dir/eval/<name>) and its
    log."""
    return os.path.join(work_dir, 'eval', name), os.path.join(work_dir, f'eval_{name}.log')


def distill_run(method, seed, name, student='student', *extra, config='config/tiny.py'):
    """A fresh distill.py run from a student toward the teacher, distill_steps long; its last
    checkpoint."""
    out = os.path.join(work_dir, 'runs', name)
    shutil.rmtree(out, ignore_errors=True)
    run_script(['distill.py', config, f'--method={method}', f'--seed={seed}', f'--out_dir={out}',
                f'--student={model_path(student)}', f"--teacher={model_path('teacher')}",
                f'--max_steps={distill_steps}', *extra],
               os.path.join(work_dir, f'{name}.log'), every=10)
    from model import checkpoints_in
    return checkpoints_in(out)[-1]


def quick_start():
    t0 = time.time()
    if remake:
        make_pair()
        make_small()
    else:
        check_shipped(pair_models())
    t_pair = time.time() - t0
    before = accuracy(model_path('student'), *eval_paths('student'))
    teacher = accuracy(model_path('teacher'), *eval_paths('teacher'))
    after = accuracy(distill_run('oprd', 0, 'oprd_seed0'), *eval_paths('oprd_seed0'))
    gap = (after - before) / max(teacher - before, 1e-9)
    wall = time.time() - t0
    print("\ntiny task, greedy accuracy on 256 held-out problems:")
    print(f"  student before   {100 * before:5.1f}%")
    print(f"  teacher          {100 * teacher:5.1f}%")
    print(f"  student + OPRD   {100 * after:5.1f}%   ({100 * gap:.0f}% of the teacher-student gap "
          f"closed in {distill_steps} steps)")
    if remake:
        print(f"{wall / 60:.1f} minutes in all, {t_pair / 60:.1f} of them making the models")
    else:
        print(f"{wall / 60:.1f} minutes in all")


def tune_runs():
    """The numbers behind the settings, all on the validation split (never the held-out test
    problems): every kept checkpoint of the pair's SFT run, then OPRD from the student at each of
    tune_lrs; to work_dir/tune.md."""
    from model import checkpoints_in
    pair = pair_models()
    sft = os.path.join(work_dir, 'sft_pair')
    recorded = read_record(os.path.join(work_dir, 'sft_pair.json'))
    if not os.path.isdir(sft) or recorded != pair.recipe():
        make_models(pair)
    val = write_val(os.path.join(work_dir, 'val.jsonl'))
    lines = [f"Greedy accuracy on the validation split ({val}, 512 problems); "
             "gap closed = (after - before) / (teacher - before).",
             "",
             "| model | accuracy (%) | gap closed |",
             "|---|---|---|"]
    acc = {}
    roles = {student_step: ' (the student)', teacher_step: ' (the teacher)'}
    for ckpt in checkpoints_in(sft):
        step = int(ckpt.rsplit('_', 1)[1])
        acc[step] = accuracy(ckpt, *eval_paths(f'val_sft_{step}'), bench=val)
        lines.append(f"| SFT step {step}{roles.get(step, '')} | {100 * acc[step]:.1f} | |")
    before = acc[student_step]
    teacher = acc[teacher_step]
    for lr in tune_lrs.split(','):
        run = f'val_oprd_lr{lr}'
        last = distill_run('oprd', 0, run, 'student', f'--lr={lr}')
        after = accuracy(last, *eval_paths(run), bench=val)
        gap = (after - before) / max(teacher - before, 1e-9)
        lines.append(f"| student + OPRD, {distill_steps} steps at lr {lr} | {100 * after:.1f} | "
                     f"{100 * gap:.0f}% |")
    text = '\n'.join(lines)
    print(text)
    with open(os.path.join(work_dir, 'tune.md'), 'w') as f:
        f.write(text + '\n')


def xtok_teacher():
    """Make the teacher across tokenizers and print its greedy accuracy on the held-out problems."""
    from tokenizer import load_tokenizer
    t0 = time.time()
    make_xteacher()
    tok = load_tokenizer(model_path('xteacher'))
    text = '37+48=85'
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    acc = accuracy(model_path('xteacher'), *eval_paths('xteacher'))
    width = SHAPES['xteacher']['hidden_size']
    print(f"\nteacher across tokenizers (llama, d = {width}, BPE of {BPE_VOCAB} tokens: "
          f"{text!r} -> {pieces}): greedy accuracy {100 * acc:.1f}% on 256 held-out problems")
    print(f"{(time.time() - t0) / 60:.1f} minutes")


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), __file__)
    os.makedirs(work_dir, exist_ok=True)
    if tune:
        tune_runs()
    elif xtok:
        xtok_teacher()
    else:
        quick_start()
