"""
The small-scale study behind RESULTS.md: every method at its own learning rate, the paper's
ablations of OPRD, and a student of another width and depth, on the built-in tiny task. It trains
from the models tiny.py ships (models/tiny: the pair and the small student, used as they are)
through tiny.py's runner and evaluation.

$ python -m lab.study            # 66 minutes on 2 CPU cores; finished runs and evaluations
                                 # are reused
$ python -m lab.study --jobs=1   # one run at a time (each run uses one thread)
$ python -m lab.study --xtok=True   # the cross-tokenizer block instead (below)
$ python -m lab.study --lag=True    # the block of one step of lag instead (below)

1. Rates. Each method of the main table (and each cross-width row) is trained from its student for
   the same step budget (tiny.py's distill_steps) and rollouts per step at the rates of GRID, one
   seed, and scored on the validation split (tiny.write_val: 512 problems kept apart from training
   and from the held-out test). While the best rate sits at an edge of those tried, the next rate
   of LADDER beyond it is tried too.
2. Test. At the chosen rate, `seeds` seeds, greedy accuracy on the 256 held-out test problems after
   every EVAL_EVERY steps (seed 0 is the very run that chose the rate, now scored on the test
   problems).
3. Ablations of OPRD at OPRD's chosen rate (the combined objective's µ at opd+oprd's), `seeds`
   seeds each.

With --xtok=True, the cross-tokenizer block: tiny.py's student (byte-level, Qwen3) toward the
teacher of another family, width and tokenizer (tiny.py --xtok=True's Llama with its BPE), through
the methods that work across tokenizers (XTOK), steps 1 and 2 the same; its runs go to
work_dir/xstudy, its table to RESULTS.md's xstudy block.

With --lag=True, the block of one step of lag (off_policy_steps=1: each step trains on rollouts of
the weights one update old, as with sampler ranks): the methods of LAG at the rates the main study
chose (figures/study.json), on-policy and one step behind, `seeds` seeds each, and opd one step
behind without its importance ratio (importance_cap=0); its runs go to work_dir/lagstudy, its table
to RESULTS.md's lag block.

Everything runs through distill.py and eval.py as subprocesses, `jobs` at a time, with the torch
sampler. Results go to work_dir/study/ (runs, evaluations, logs, study.json, study.md); the tables
and the plot are then written into RESULTS.md (between its study markers), README.md's headline
table and figures/, with the raw figures in figures/study.json.
"""
import json
import os
import re
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import tiny
from lab import plot
# the generated blocks' markers, and what writes each block
from lab.tables import (BEGIN, END, FIGURES, HEADLINE_BEGIN, HEADLINE_END, LAG_BEGIN, LAG_END,
                        XBEGIN, XEND, pct, render, render_headline, render_lag, render_xtok)

# -----------------------------------------------------------------------------
work_dir = 'tiny'              # tiny.py's work folder: the runs go to work_dir/study
jobs = 2                       # runs at a time, one thread each
seeds = 3                      # seeds per row and per ablation on the test problems
xtok = False                   # the cross-tokenizer block instead of the main study
lag = False                    # the block of one step of lag instead of the main study
# -----------------------------------------------------------------------------

# learning rates, half a decade apart
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
GRID = (3e-4, 1e-3, 3e-3)      # tried first, for every method
EVAL_EVERY = 20                # test accuracy after every this many steps: the plot's points
# first_k / last_k: a third of the typical 36-token response (the paper: the last 2,000 tokens of
# responses that run to several thousand)
K_POSITIONS = 12
RESULTS, README = 'RESULTS.md', 'README.md'


@dataclass(frozen=True)
class Row:
    """One line of a table: what is trained, from which student."""
    who: str                   # 'student' (the teacher's shape) | 'small' (another width and depth)
    label: str                 # as the table prints it
    method: str
    args: tuple = ()           # further distill.py settings
    config: str = 'config/tiny.py'
    bridge: int = 0            # OPRD-Bridge rank: stage 1 fits it first
    teacher: str = 'teacher'   # 'xteacher': the teacher of another tokenizer

    @property
    def key(self):
        return f"{self.who}-{re.sub(r'[^A-Za-z0-9.]+', '_', self.label).strip('_')}"


MAIN = [Row('student', 'oprd', 'oprd'),
        Row('student', 'opd (sampled token)', 'opd'),
        Row('student', 'opd_topk (k = 16)', 'opd_topk'),
        Row('student', 'opd_full', 'opd_full'),
        Row('student', 'opd+oprd (µ = 1)', 'opd+oprd'),
        # 64 sequences a step too
        Row('student', 'sft (reference solutions)', 'sft', ('--prompts_per_step=64',))]
SMALL = [Row('small', 'opd (sampled token)', 'opd'),
         Row('small', 'opd_topk (k = 16)', 'opd_topk'),
         # the paper's v1: a random start
         Row('small', 'oprd + learned projector', 'oprd', ('--projector=True',)),
         Row('small', 'oprd + learned projector, least-squares start', 'oprd',
             ('--projector=True', '--projector_init=lstsq'))] + [
    Row('small', f'oprd_bridge (r = {r})', 'oprd_bridge', (), 'config/tiny_bridge.py', r)
    for r in (4, 8, 16)] + [
    # what 60 steps can teach it
    Row('small', 'sft (reference solutions)', 'sft', ('--prompts_per_step=64',))]
# (group, setting, row, the main row whose rate it uses, what the paper says): the default settings
# are MAIN[0]
ABLATIONS = [('layers', s, Row('student', f'layers {s}', 'oprd', (f'--layers={s}',)), 'oprd', p)
             for s, p in (('last', ''), ('even', ''), ('odd', ''))] + [
    ('positions', s,
     Row('student', f'positions {s}', 'oprd', (f'--positions={s}', f'--k_positions={K_POSITIONS}')),
     'oprd', p) for s, p in (('first_k', ''), ('last_k', 'paper default (k = 2000)'))] + [
    ('distance', 'normalized_mse',
     Row('student', 'distance normalized_mse', 'oprd', ('--distance=normalized_mse',)),
     'oprd', "the authors' later code"),
    ('align', 'token', Row('student', 'align token', 'oprd', ('--align=token',)), 'oprd',
     "the paper's code")] + [
    ('µ (opd + µ·oprd)', f'µ = {mu:g}',
     Row('student', f'mu {mu:g}', 'opd+oprd', (f'--mu={mu:g}',)), 'opd+oprd (µ = 1)', p)
    for mu, p in ((0, '42.3'), (0.1, ''), (10, '50.2'))]
XTOK = [Row('student', 'sft (reference solutions)', 'sft', ('--prompts_per_step=64',),
            teacher='xteacher'),
        Row('student', 'opd_chunk (sampled token, per chunk)', 'opd_chunk', teacher='xteacher'),
        Row('student', 'oprd + learned projector, least-squares start', 'oprd',
            ('--projector=True', '--projector_init=lstsq'), teacher='xteacher')] + [
    Row('student', label, method, (), 'config/tiny_bridge.py', r, 'xteacher')
    for label, method, r in (
        ('oprd_bridge (r = 4)', 'oprd_bridge', 4),
        ('oprd_bridge (r = 8)', 'oprd_bridge', 8),
        ('opd_chunk + oprd_bridge (r = 4, µ = 1)', 'opd_chunk+oprd_bridge', 4))]
# the lag block: (the main table's label, method), each on-policy and one step behind
LAG = [('oprd', 'oprd'), ('opd (sampled token)', 'opd'), ('opd_topk (k = 16)', 'opd_topk'),
       ('opd_full', 'opd_full')]
ONE_STEP_BEHIND = ('--off_policy_steps=1',)


# ----------------------------------------------------------------------------- choosing the rate

def choose_rate(val):
    """The rate with the best validation accuracy ({lr: accuracy, or None where distill.py stopped
    the run}); a tie goes to the smaller rate."""
    finished = sorted(lr for lr in val if val[lr] is not None)
    if not finished:
        raise RuntimeError(f"distill.py stopped the run at every rate tried ({sorted(val)})")
    return max(finished, key=lambda lr: val[lr])


def next_rate(val):
    """The LADDER's next rate past the tried range when the best sits at its edge (else None)."""
    best, tried = choose_rate(val), sorted(val)
    i = LADDER.index(best)
    if best == tried[0] and i > 0:
        return LADDER[i - 1]
    if best == tried[-1] and i + 1 < len(LADDER):
        return LADDER[i + 1]
    return None


# ----------------------------------------------------------------------------- running and scoring

# how distill.py's last line reads where it stopped a run mid-way
STOPPED = re.compile(r'error: (step \d+: |\d+ non-finite steps in a row)')


def block_folder():
    """The work_dir folder of this invocation's block."""
    return 'xstudy' if xtok else 'lagstudy' if lag else 'study'


def study_path(*parts):
    """A path under work_dir/study (or the other block's folder), where every run, evaluation and
    log of the block lives."""
    return os.path.join(tiny.work_dir, block_folder(), *parts)


def run_quietly(args, log):
    """One of the project's scripts, on one thread, nothing on the terminal: `jobs` of them share
    the cores."""
    tiny.run_script(args, log, echo=False, threads=1)


def score(ckpt, name, split):
    """Greedy accuracy of a checkpoint on 'val' (the validation split) or 'test' (the held-out
    problems); an evaluation finished by an earlier invocation is reused."""
    bench = study_path('val.jsonl') if split == 'val' else 'tiny'
    return tiny.accuracy(ckpt, study_path('eval', name), study_path('logs', f'eval-{name}.log'),
                         bench, reuse=True, echo=False, threads=1)


def fit_bridge(rank, student='small', teacher='teacher'):
    """OPRD-Bridge stage 1 at this rank from a student to a teacher (seed 0; every seed of stage 2
    shares it)."""
    path = study_path('bridges', f'r{rank}')
    if not os.path.isfile(os.path.join(path, 'bridge.json')):
        run_quietly(['distill.py', 'config/tiny_bridge.py', '--method=bridge_fit', '--seed=0',
                     f'--bridge_rank={rank}', f'--bridge_path={path}',
                     f'--student={tiny.model_path(student)}',
                     f'--teacher={tiny.model_path(teacher)}',
                     '--backend=torch',
                     f"--out_dir={study_path('runs', f'fit_r{rank}')}"],
                    study_path('logs', f'fit_r{rank}.log'))
    with open(os.path.join(path, 'bridge.json')) as f:
        return json.load(f)


def stopped_at(log):
    """distill.py's own last line where it stopped a run mid-way (the non-finite steps' or a step's
    'error: step N: ...': the sampler check, the tokenizers' alignment), else None."""
    if not os.path.isfile(log):
        return None
    with open(log) as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines and STOPPED.match(lines[-1]) else None


def train(row, lr, seed, splits):
    """Train row at lr (unless its run is finished), then score its checkpoints: {split: {step:
    accuracy}}, the last step on 'val', every kept step on 'test'. On 'val' alone (the choice of
    rate) a rate at which distill.py stops the run has failed: its accuracy is None (and the run
    is not tried again)."""
    name = f'{row.key}-lr{lr:g}-s{seed}'
    out, steps = study_path('runs', name), tiny.distill_steps
    log = study_path('logs', f'{name}.log')
    choosing = splits == ('val',)
    if choosing and stopped_at(log):
        return {'val': {steps: None}}
    if not os.path.isdir(os.path.join(out, f'step_{steps:07d}')):
        shutil.rmtree(out, ignore_errors=True)
        bridge = ((f"--bridge_path={study_path('bridges', f'r{row.bridge}')}",) if row.bridge
                  else ())
        try:
            run_quietly(['distill.py', row.config, f'--method={row.method}', f'--seed={seed}',
                         f'--lr={lr}', f'--out_dir={out}',
                         f'--student={tiny.model_path(row.who)}',
                         f'--teacher={tiny.model_path(row.teacher)}',
                         f'--max_steps={steps}', '--backend=torch', f'--save_every={EVAL_EVERY}',
                         f'--keep_checkpoints={steps // EVAL_EVERY}', *row.args, *bridge], log)
        except RuntimeError:
            if not (choosing and stopped_at(log)):
                raise
            return {'val': {steps: None}}
    acc = {}
    for split in splits:
        scored = range(EVAL_EVERY, steps + 1, EVAL_EVERY) if split == 'test' else [steps]
        acc[split] = {s: score(os.path.join(out, f'step_{s:07d}'), f'{name}-{split}{s}', split)
                      for s in scored}
    return acc


def diagnose(row, lr):
    """From seed 0's log, at steps 0, EVAL_EVERY, ... and the last: the alignment (the mean cosine
    over layers, or the KL for output-space rows), the response length and the truncation rate."""
    with open(study_path('runs', f'{row.key}-lr{lr:g}-s0', 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    records = records[::EVAL_EVERY] + ([records[-1]] if (len(records) - 1) % EVAL_EVERY else [])
    series = {k: [r[k] for r in records]
              for k in ('mean_response_len', 'trunc_rate', 'kl') if k in records[0]}
    cosines = [k for k in records[0] if k.startswith('cos/')]
    if cosines:
        series['cos'] = [statistics.mean(r[k] for k in cosines) for r in records]
    return series


def parallel(fn, items, describe):
    """fn over items, `jobs` at a time, in threads that each wait on a subprocess; a line as each
    finishes. The first failure cancels what has not started and is raised once the running ones
    end."""
    t0, results = time.time(), [None] * len(items)
    pool = ThreadPoolExecutor(max(1, jobs))
    try:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for n, done in enumerate(as_completed(futures)):
            i = futures[done]
            results[i] = done.result()
            print(f"  [{n + 1}/{len(items)}] {describe(items[i], results[i])} "
                  f"({(time.time() - t0) / 60:.1f} min)", flush=True)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def describe_run(job, acc):
    """'student oprd, lr 0.001, seed 0: val 93.2%' for a run (row, lr, seed) and its scores."""
    row, lr, seed = job
    split = next(iter(acc))
    last = acc[split][max(acc[split])]
    scored = 'distill.py stopped the run' if last is None else f"{split} {pct(last)}%"
    return f"{row.who} {row.label}, lr {lr:g}, seed {seed}: {scored}"


def minutes_so_far(since):
    """(minutes the study has cost so far, now): earlier invocations' minutes
    (work_dir/study/minutes, cleared with the runs when the models are remade) plus this one's since
    `since`, written back. A rerun that reuses finished runs thus reports what they cost, not the
    seconds it took to read them."""
    path, now = study_path('minutes'), time.time()
    total = (float(open(path).read()) if os.path.isfile(path) else 0.0) + (now - since) / 60
    with open(path, 'w') as f:
        f.write(f'{total}\n')
    return total, now


def choose_rates(rows, since):
    """Seed 0 of every row at each rate, scored on the validation split, until no row's best rate
    sits at an edge of those tried: ({row: {lr: accuracy}}, {row: the chosen rate}, since)."""
    print("rates: seed 0 of every row at each rate, scored on the validation split", flush=True)
    val = {row: {} for row in rows}
    todo = [(row, lr, 0) for row in rows for lr in GRID]
    while todo:
        results = parallel(lambda job: train(*job, ('val',)), todo, describe_run)
        for (row, lr, _), acc in zip(todo, results):
            val[row][lr] = acc['val'][tiny.distill_steps]
        todo = [(row, next_rate(val[row]), 0) for row in rows if next_rate(val[row]) is not None]
        _, since = minutes_so_far(since)
    return val, {row: choose_rate(val[row]) for row in rows}, since


def seed_runs(todo):
    """Every (row, lr, seed) of todo trained and scored on the test problems: {job: {'test': {step:
    accuracy}}}."""
    return dict(zip(todo, parallel(lambda job: train(*job, ('test',)), todo, describe_run)))


def curves(row, lr, test, before):
    """Per seed: the student before, then test accuracy after every EVAL_EVERY steps."""
    return [[before] + [test[(row, lr, s)]['test'][k] for k in sorted(test[(row, lr, s)]['test'])]
            for s in range(seeds)]


def table(row, val, rate, test, before):
    return dict(label=row.label, val={f'{lr:g}': a for lr, a in sorted(val[row].items())},
                lr=f'{rate[row]:g}', curves=curves(row, rate[row], test, before),
                diagnosis=diagnose(row, rate[row]))


def common(res, since):
    """What every block's study.json records besides its tables."""
    return dict(res, minutes=minutes_so_far(since)[0], steps=tiny.distill_steps,
                eval_every=EVAL_EVERY, seeds=seeds, jobs=jobs,
                diagnosis_steps=([str(s) for s in range(0, tiny.distill_steps, EVAL_EVERY)]
                                 + [str(tiny.distill_steps - 1)]),
                shapes={k: f"{v['num_hidden_layers']} layers, d = {v['hidden_size']}"
                        for k, v in tiny.SHAPES.items()})


def bridge_figures(bridges):
    return {str(rank): {'heldout_cos': statistics.mean(b['heldout_cos'].values()),
                        'cos_by_rank_mean': b['cos_by_rank_mean']} for rank, b in bridges.items()}


def prepare(who, shipped, make=()):
    """The models (the shipped ones as they are, the others made by their recipe or reused), the
    study's folders, the validation split, and the base accuracies."""
    for models in shipped:
        tiny.check_shipped(models())
    for make_models in make:
        make_models()
    for folder in ('runs', 'eval', 'logs', 'bridges'):
        os.makedirs(study_path(folder), exist_ok=True)
    tiny.write_val(study_path('val.jsonl'))
    return {w: {split: score(tiny.model_path(w), f'{w}-{split}', split)
                for split in ('val', 'test')}
            for w in who}


def run_study():
    """The models, the rates (validation), the seeds and ablations (test), then every figure the
    tables and the plot need, as the dict that study.json keeps."""
    since = time.time()
    base = prepare(('student', 'small', 'teacher'), (tiny.pair_models, tiny.small_models))
    ranks = sorted({row.bridge for row in SMALL if row.bridge})
    bridges = dict(zip(ranks, parallel(fit_bridge, ranks,
                                       lambda rank, _: f"bridge r = {rank} fitted")))
    rows = MAIN + SMALL
    _, since = minutes_so_far(since)
    val, rate, since = choose_rates(rows, since)
    rate_of_label = {row.label: rate[row] for row in MAIN}

    print(f"test: {seeds} seeds at the chosen rates, and the ablations", flush=True)
    todo = [(row, rate[row], s) for row in rows for s in range(seeds)]
    todo += [(row, rate_of_label[base_label], s)
             for _, _, row, base_label, _ in ABLATIONS for s in range(seeds)]
    test = seed_runs(todo)
    return common({
        'k_positions': K_POSITIONS, 'base': base,
        'main': [table(row, val, rate, test, base['student']['test']) for row in MAIN],
        'small': [table(row, val, rate, test, base['small']['test']) for row in SMALL],
        'ablations': [dict(group=group, setting=setting, lr=f'{rate_of_label[base_label]:g}',
                           paper=paper,
                           test=[c[-1] for c in curves(row, rate_of_label[base_label], test,
                                                       base['student']['test'])])
                      for group, setting, row, base_label, paper in ABLATIONS],
        'bridges': bridge_figures(bridges)}, since)


def run_xtok():
    """The cross-tokenizer block: the rates (validation) and the seeds (test) of XTOK, as the dict
    study.json keeps."""
    since = time.time()
    base = prepare(('student', 'xteacher'), (tiny.pair_models,), (tiny.make_xteacher,))
    ranks = sorted({row.bridge for row in XTOK if row.bridge})
    bridges = dict(zip(ranks, parallel(lambda rank: fit_bridge(rank, 'student', 'xteacher'), ranks,
                                       lambda rank, _: f"bridge r = {rank} fitted")))
    _, since = minutes_so_far(since)
    val, rate, since = choose_rates(XTOK, since)
    print(f"test: {seeds} seeds at the chosen rates", flush=True)
    test = seed_runs([(row, rate[row], s) for row in XTOK for s in range(seeds)])
    return common({'base': base,
                   'xtok': [table(row, val, rate, test, base['student']['test']) for row in XTOK],
                   'bridges': bridge_figures(bridges)}, since)


def lag_rows():
    """(label, rate of the main study, on-policy Row, one-step-behind Row) per method of LAG, and
    opd's one-step-behind Row without the ratio."""
    with open(os.path.join(tiny.ROOT, FIGURES, 'study.json')) as f:
        rate = {e['label']: float(e['lr']) for e in json.load(f)['main']}
    rows = [(label, rate[label], Row('student', label, method),
             Row('student', f'{label}, one step behind', method, ONE_STEP_BEHIND))
            for label, method in LAG]
    no_ratio = Row('student', 'opd (sampled token), one step behind, no ratio', 'opd',
                   ONE_STEP_BEHIND + ('--importance_cap=0',))
    return rows, no_ratio


def run_lag():
    """The block of one step of lag: every row of lag_rows on the test problems, `seeds` seeds, as
    the dict study.json keeps."""
    since = time.time()
    base = prepare(('student', 'teacher'), (tiny.pair_models,))
    rows, no_ratio = lag_rows()
    opd_rate = next(lr for label, lr, _, _ in rows if label.startswith('opd (sampled'))
    jobs_of = [(row, lr) for _, lr, on, behind in rows for row in (on, behind)]
    jobs_of.append((no_ratio, opd_rate))
    print(f"lag: {seeds} seeds on-policy and one step behind, at the main study's rates",
          flush=True)
    test = seed_runs([(row, lr, s) for row, lr in jobs_of for s in range(seeds)])

    def finals(row, lr):
        return [c[-1] for c in curves(row, lr, test, base['student']['test'])]
    entries = [dict(label=label, lr=f'{lr:g}', on=finals(on, lr), behind=finals(behind, lr))
               for label, lr, on, behind in rows]
    return common({'base': base, 'lag': entries,
                   'no_ratio': dict(label=no_ratio.label, lr=f'{opd_rate:g}',
                                    behind=finals(no_ratio, opd_rate))}, since)


def replace_block(doc, begin, end, text, path):
    """doc with its begin ... end block replaced by text (which carries the markers)."""
    if begin not in doc or end not in doc:
        raise SystemExit(f"error: {path} has no generated block "
                         f"(its markers: {begin!r} ... {end!r})")
    head, rest = doc.split(begin, 1)
    return head + text + rest.split(end, 1)[1]


def blocks(res, results, readme):
    """(document, begin, end, text) of every generated block this invocation writes."""
    if xtok:
        return [(results, XBEGIN, XEND, render_xtok(res))]
    if lag:
        return [(results, LAG_BEGIN, LAG_END, render_lag(res))]
    return [(results, BEGIN, END, render(res)),
            (readme, HEADLINE_BEGIN, HEADLINE_END, render_headline(res))]


def write_outputs(res, results=os.path.join(tiny.ROOT, RESULTS),
                  readme=os.path.join(tiny.ROOT, README),
                  figures=os.path.join(tiny.ROOT, FIGURES)):
    """study.json and study.md beside the runs; figures/study.json and .png (xtok:
    figures/xstudy.json, lag: figures/lag.json); RESULTS.md's block and README.md's headline
    replaced. The documents are
    checked for their markers before anything is written."""
    docs, todo = {}, blocks(res, results, readme)
    for path, begin, end, block in todo:
        with open(path) as f:
            docs[path] = replace_block(f.read(), begin, end, block, path)
    text = todo[0][3]
    for path, body in ((study_path('study.json'), json.dumps(res, indent=1)),
                       (study_path('study.md'), text)):
        with open(path, 'w') as f:
            f.write(body + '\n')
    os.makedirs(figures, exist_ok=True)
    figures_json = 'xstudy.json' if xtok else 'lag.json' if lag else 'study.json'
    shutil.copy(study_path('study.json'), os.path.join(figures, figures_json))
    if not (xtok or lag):
        plot.save(res, os.path.join(figures, 'study.png'))
    for path, doc in docs.items():
        with open(path, 'w') as f:
            f.write(doc)
    print(text)
    print(f"wrote {study_path('study.md')}, {figures}/ and "
          + ' and '.join(f"{p}'s {b.split(':')[0][5:]} block" for p, b, _, _ in todo))


if __name__ == '__main__':
    from configurator import configure
    configure(globals(), __file__)
    if jobs < 1 or seeds < 1:
        print(f"error: jobs and seeds must be at least 1 (got jobs={jobs}, seeds={seeds})",
              file=sys.stderr)
        sys.exit(2)
    if xtok and lag:
        print("error: xtok and lag are two blocks: run one at a time", file=sys.stderr)
        sys.exit(2)
    markers = [(BEGIN, END, RESULTS), (HEADLINE_BEGIN, HEADLINE_END, README)]
    if xtok:
        markers = [(XBEGIN, XEND, RESULTS)]
    if lag:
        markers = [(LAG_BEGIN, LAG_END, RESULTS)]
    for begin, end, doc in markers:  # before any work
        with open(os.path.join(tiny.ROOT, doc)) as f:
            replace_block(f.read(), begin, end, '', doc)
    # tiny.py's runners and the cross-tokenizer teacher's maker work there
    tiny.work_dir = work_dir
    os.makedirs(os.path.join(work_dir, block_folder()), exist_ok=True)
    write_outputs(run_xtok() if xtok else run_lag() if lag else run_study())
