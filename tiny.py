"""
The embedded default: OPRD end to end on a CPU in minutes, on the built-in tiny task (eval.py: 'tiny').

$ python tiny.py                  # make teacher + student if absent, OPRD through vLLM rollouts, evaluate
$ python tiny.py --table=True     # README's small-scale table: every method, equal steps, 3 seeds
                                  # (runs already evaluated in work_dir are reused: delete it to redo them)

Everything runs through the project's own scripts as subprocesses (distill.py for SFT and distillation,
eval.py for accuracy), so what this prints is what a user of those scripts gets.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

# -----------------------------------------------------------------------------
work_dir = 'tiny'             # models, runs and evaluations go here
table = False                 # the small-scale table instead of the quick start
methods = 'oprd,opd,opd_topk,opd_full,opd+oprd'
seeds = 3
distill_steps = 60            # equal step budget for every method
eval_backend = 'auto'
table_backend = 'torch'       # the table's many short runs: the torch sampler, no engine start per run
# -----------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.abspath(__file__))
# the tiny Qwen3-architecture models: head_dim 32 so that vLLM's CPU attention serves them
SHAPES = {'student': dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=384),
          # the smaller student of another width and depth, for the projector and Bridge paths
          'small': dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                        intermediate_size=192)}


def sh(args, log=None):
    """Run one of the project's scripts; its output goes to the terminal (and a log file)."""
    cmd = [sys.executable] + args
    print('$ ' + ' '.join(['python'] + args), flush=True)
    with open(log, 'w') if log else open(os.devnull, 'w') as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            f.write(line)
            if not line.startswith('config:'):
                print('  ' + line, end='', flush=True)
        if p.wait() != 0:
            raise SystemExit(f"error: {' '.join(args[:1])} failed (exit {p.returncode})")


def make_init(path, seed=0, **shape):
    """A randomly initialised tiny Qwen3 checkpoint that uses the built-in byte-level tokenizer."""
    import torch
    from model import ModelConfig, Transformer, to_hf_config
    from rollout import ByteTokenizer, mark_byte_tokenizer
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    cfg = ModelConfig(model_type='qwen3', vocab_size=tok.vocab_size, head_dim=32, rope_theta=10000.0,
                      tie_word_embeddings=True, **shape)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            torch.nn.init.normal_(p, std=0.02)
        elif 'norm' in name:
            torch.nn.init.ones_(p)
    model.hf_config = dict(to_hf_config(cfg), eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
    model.save_pretrained(path)
    mark_byte_tokenizer(path)


def make_pair():
    """Teacher and student from one SFT run: the checkpoint at step 400 is the student, at 1000 the teacher."""
    w = work_dir
    if all(os.path.isfile(os.path.join(w, m, 'config.json')) for m in ('teacher', 'student')):
        return
    init = os.path.join(w, 'init')
    make_init(init, **SHAPES['student'])
    sft = os.path.join(w, 'sft')
    sh(['distill.py', 'config/tiny_sft.py', f'--student={init}', f'--out_dir={sft}'], os.path.join(w, 'sft.log'))
    for name, step in (('student', 400), ('teacher', 1000)):
        keep(os.path.join(sft, f'step_{step:07d}'), os.path.join(w, name))


def make_small():
    """The smaller student (another width and depth): its own SFT run, 1000 steps."""
    w = work_dir
    if os.path.isfile(os.path.join(w, 'small', 'config.json')):
        return
    init = os.path.join(w, 'init_small')
    make_init(init, seed=1, **SHAPES['small'])
    sft = os.path.join(w, 'sft_small')
    sh(['distill.py', 'config/tiny_sft.py', f'--student={init}', f'--out_dir={sft}'], os.path.join(w, 'sft_small.log'))
    keep(os.path.join(sft, 'step_0001000'), os.path.join(w, 'small'))


def keep(ckpt, dst):
    """A checkpoint of distill.py as a plain model folder (without its resume state)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ckpt, dst, ignore=shutil.ignore_patterns('resume.pt'))


def accuracy(ckpt, name, backend=None):
    """Greedy accuracy on the held-out tiny benchmark (256 problems), through eval.py."""
    out = os.path.join(work_dir, 'eval', name)
    sh(['eval.py', f'--ckpt={ckpt}', '--benchmarks=tiny', '--n_samples=1', '--temperature=0.0', '--top_p=1.0',
        '--max_new_tokens=64', '--max_prompt_tokens=64', f'--backend={backend or eval_backend}', f'--out={out}'],
       os.path.join(work_dir, f'eval_{name}.log'))
    with open(os.path.join(out, 'summary.json')) as f:
        return json.load(f)['tiny']['avg@1']


def distill_run(method, seed, name, student='student', *extra, config='config/tiny.py'):
    out = os.path.join(work_dir, 'runs', name)
    shutil.rmtree(out, ignore_errors=True)
    sh(['distill.py', config, f'--method={method}', f'--seed={seed}', f'--out_dir={out}',
        f'--student={work_dir}/{student}', f'--teacher={work_dir}/teacher', f'--max_steps={distill_steps}', *extra],
       os.path.join(work_dir, f'{name}.log'))
    from model import checkpoints_in
    return checkpoints_in(out)[-1]


def bridge_run(seed, name):
    """OPRD-Bridge on the smaller student: stage 1 fits a rank-8 bridge from its rollouts, stage 2 distils."""
    bridge = os.path.join(work_dir, 'bridges', name)
    args = ('--bridge_path=' + bridge, f'--backend={table_backend}')
    sh(['distill.py', 'config/tiny_bridge.py', '--method=bridge_fit', f'--seed={seed}', f'--student={work_dir}/small',
        f'--teacher={work_dir}/teacher', *args], os.path.join(work_dir, f'{name}_fit.log'))
    return distill_run('oprd_bridge', seed, name, 'small', *args, config='config/tiny_bridge.py')


def quick_start():
    t0 = time.time()
    make_pair()
    before = accuracy(f'{work_dir}/student', 'student')
    teacher = accuracy(f'{work_dir}/teacher', 'teacher')
    after = accuracy(distill_run('oprd', 0, 'oprd_seed0'), 'oprd_seed0')
    gap = (after - before) / max(teacher - before, 1e-9)
    print(f"\ntiny task, greedy accuracy on 256 held-out problems ({time.time() - t0:.0f} s in all):")
    print(f"  student before   {100 * before:5.1f}%")
    print(f"  teacher          {100 * teacher:5.1f}%")
    print(f"  student + OPRD   {100 * after:5.1f}%   ({100 * gap:.0f}% of the teacher-student gap closed "
          f"in {distill_steps} steps)")


def small_scale_table():
    """Every method from the same student with the same step budget, `seeds` seeds each, greedy accuracy."""
    make_pair()
    make_small()
    teacher = accuracy(f'{work_dir}/teacher', 'teacher', table_backend)
    rows = []
    # (student, label, method, extra distill.py arguments)
    backend = (f'--backend={table_backend}',)
    runs = [('student', m, m, backend) for m in methods.split(',')]
    runs += [('small', 'opd (sampled-token)', 'opd', backend),
             ('small', 'oprd + projector', 'oprd', backend + ('--projector=True',)),
             ('small', 'oprd_bridge (r = 8)', 'oprd_bridge', None)]
    for student in ('student', 'small'):
        base = accuracy(f'{work_dir}/{student}', student, table_backend)
        rows.append((student, f'{student} (before)', base, 0.0, 0.0))
        for who, label, method, extra in runs:
            if who != student:
                continue
            accs = []
            for seed in range(seeds):
                name = f"{student}_{method}_seed{seed}"
                done = os.path.join(work_dir, 'eval', name, 'summary.json')
                if os.path.isfile(done):  # evaluated by an earlier (interrupted) table run: reused
                    with open(done) as f:
                        accs.append(json.load(f)['tiny']['avg@1'])
                    continue
                ckpt = bridge_run(seed, name) if method == 'oprd_bridge' else \
                    distill_run(method, seed, name, student, *extra)
                accs.append(accuracy(ckpt, name, table_backend))
            mean, sd = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
            rows.append((student, label, mean, sd, (mean - base) / max(teacher - base, 1e-9)))
    shape = {k: f"{v['num_hidden_layers']} layers, d={v['hidden_size']}" for k, v in SHAPES.items()}
    lines = [f"Teacher ({shape['student']}): {100 * teacher:.1f}%. Greedy accuracy on 256 held-out problems after "
             f"{distill_steps} steps, mean ± sd over {seeds} seeds; gap closed = (after − before) / "
             f"(teacher − before).", "",
             "| student | method | accuracy (%) | gap closed |", "|---|---|---|---|"]
    for student, label, mean, sd, gap in rows:
        lines.append(f"| {student} ({shape[student]}) | {label} | {100 * mean:.1f} ± {100 * sd:.1f} | {100 * gap:.0f}% |")
    text = '\n'.join(lines)
    print(text)
    with open(os.path.join(work_dir, 'table.md'), 'w') as f:
        f.write(text + '\n')


if __name__ == '__main__':
    from configurator import ConfigError, apply_config
    keys = [k for k, v in list(globals().items()) if not k.startswith('_') and k.islower()
            and isinstance(v, (int, float, bool, str))]
    try:
        globals().update(apply_config(sys.argv[1:], {k: globals()[k] for k in keys}))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(work_dir, exist_ok=True)
    small_scale_table() if table else quick_start()
