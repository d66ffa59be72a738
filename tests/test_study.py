"""lab/study.py without training: the rate selection, the whole schedule against fake runs (rates
widened at an edge, seeds at the chosen rate, finished runs reused, validation and test kept
apart), the tables, the plot, the generated blocks of RESULTS.md and README.md, and the command
line. Seconds."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from lab import study
import tiny


def test_choose_rate_takes_the_best_and_a_tie_goes_to_the_smaller_rate():
    assert study.choose_rate({3e-4: 0.5, 1e-3: 0.9, 3e-3: 0.7}) == 1e-3
    assert study.choose_rate({3e-3: 0.9, 3e-4: 0.5, 1e-3: 0.9}) == 1e-3


def test_next_rate_widens_only_past_an_edge_and_stops_at_the_ladder_ends():
    assert study.next_rate({3e-4: 0.5, 1e-3: 0.9, 3e-3: 0.7}) is None
    assert study.next_rate({3e-4: 0.9, 1e-3: 0.8, 3e-3: 0.7}) == 1e-4
    assert study.next_rate({3e-4: 0.1, 1e-3: 0.8, 3e-3: 0.9}) == 1e-2
    # the widened rate was worse
    assert study.next_rate({3e-4: 0.1, 1e-3: 0.8, 3e-3: 0.9, 1e-2: 0.8}) is None
    lo, hi = study.LADDER[0], study.LADDER[-1]
    assert (study.next_rate({lo: 0.9, 3 * lo: 0.1}) is None
            and study.next_rate({hi / 3: 0.1, hi: 0.9}) is None)


def fake_accuracy(ckpt, bench):
    """Accuracy as a function of the run: opd's best rate is 1e-2 (past the grid's top), every other
    one's 1e-3; the test split scores 0.05 below validation, an earlier step lower, seeds slightly
    apart."""
    if '/runs/' not in ckpt:
        base = {'teacher': 0.95, 'student': 0.4, 'small': 0.3, 'xteacher': 0.97}
        return base[os.path.basename(ckpt)]
    m = re.search(r'/(student|small)-(.+)-lr([0-9.e-]+)-s(\d)/step_(\d+)', ckpt)
    row, lr, seed, step = m[2], float(m[3]), int(m[4]), int(m[5])
    best = 1e-2 if row.startswith('opd_sampled') else 1e-3
    acc = 0.9 - 0.1 * abs(__import__('math').log10(lr / best)) - 0.01 * seed - 0.001 * (60 - step)
    return acc - (0.05 if bench == 'tiny' else 0.0)


# the models a test's study made (tiny.make_pair, make_small, make_xteacher)
MADE = []


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """lab/study.py in a temporary work_dir; distill.py and eval.py replaced by writers of what they
    would leave."""
    monkeypatch.setattr(tiny, 'work_dir', str(tmp_path / 'tiny'))
    monkeypatch.setattr(study, 'jobs', 2)
    monkeypatch.setattr(study, 'seeds', 3)
    MADE.clear()
    for name in ('make_pair', 'make_small', 'make_xteacher'):
        monkeypatch.setattr(tiny, name, lambda name=name: MADE.append(name))
    calls = []

    def run_script(args, log, every=1, echo=True, threads=None):
        assert not echo and threads == 1  # runs side by side: quiet, one thread each
        calls.append(args)
        kw = dict(a[2:].split('=', 1) for a in args[1:] if a.startswith('--'))
        if args[0] == 'eval.py':
            assert kw['benchmarks'] in ('tiny', study.study_path('val.jsonl'))
            os.makedirs(kw['out'])
            acc = fake_accuracy(kw['ckpt'], kw['benchmarks'])
            with open(os.path.join(kw['out'], 'summary.json'), 'w') as f:
                json.dump({kw['benchmarks']: {'avg@1': acc}}, f)
        elif kw['method'] == 'bridge_fit':
            os.makedirs(kw['bridge_path'])
            with open(os.path.join(kw['bridge_path'], 'bridge.json'), 'w') as f:
                json.dump({'heldout_cos': {'1': 0.5, '2': 0.7},
                           'cos_by_rank_mean': {'4': 0.6, '64': 0.8}}, f)
        else:
            assert kw['backend'] == 'torch' and kw['max_steps'] == str(tiny.distill_steps)
            for s in range(study.EVAL_EVERY, tiny.distill_steps + 1, study.EVAL_EVERY):
                os.makedirs(os.path.join(kw['out_dir'], f'step_{s:07d}'))
            recs = [{'step': i, 'mean_response_len': 36.0 - i / 10, 'trunc_rate': 0.0}
                    for i in range(60)]
            for r in recs:
                r.update({'cos/1': 0.9, 'cos/2': 0.95} if 'oprd' in kw['method'] else {'kl': 0.5})
            with open(os.path.join(kw['out_dir'], 'log.jsonl'), 'w') as f:
                f.write(''.join(json.dumps(r) + '\n' for r in recs))

    monkeypatch.setattr(tiny, 'run_script', run_script)
    return calls


def test_the_schedule_chooses_rates_on_validation_and_reports_seeds_on_test(fake, capsys):
    res = study.run_study()
    # the study trains from the shipped models, never remade
    assert MADE == []
    runs = [a for a in fake if a[0] == 'distill.py' and '--method=bridge_fit' not in a]
    fits = [a for a in fake if '--method=bridge_fit' in a]
    assert len(fits) == 3
    main = {t['label']: t for t in res['main']}
    small = {t['label']: t for t in res['small']}
    # opd's best is past the grid's top: widened to 1e-2, then 3e-2 (worse), and 1e-2 chosen; the
    # others at 1e-3
    for t in (main['opd (sampled token)'], small['opd (sampled token)']):
        assert list(t['val']) == ['0.0003', '0.001', '0.003', '0.01', '0.03'] and t['lr'] == '0.01'
    assert all(t['lr'] == '0.001' and len(t['val']) == 3 for t in res['main'] + res['small']
               if not t['label'].startswith('opd (sampled'))
    # validation at seed 0 only; on test every seed, with a point per EVAL_EVERY steps plus the
    # student before
    n_rows, n_seeds = len(study.MAIN) + len(study.SMALL), study.seeds
    assert len(runs) == n_rows * 3 + 2 * 2 + n_rows * (n_seeds - 1) + len(study.ABLATIONS) * n_seeds
    assert all(len(t['curves']) == n_seeds
               and len(t['curves'][0]) == 1 + tiny.distill_steps // study.EVAL_EVERY
               for t in res['main'] + res['small'])
    assert main['oprd']['curves'][0][0] == 0.4 and small['opd_topk (k = 16)']['curves'][0][0] == 0.3
    # seed 1, last step, test split
    assert main['oprd']['curves'][1][-1] == pytest.approx(0.9 - 0.01 - 0.05)
    mu = [a for a in res['ablations'] if a['group'].startswith('µ')]
    assert [a['lr'] for a in mu] == [main['opd+oprd (µ = 1)']['lr']] * 3
    # steps 0, 20, 40, 59
    assert small['oprd + learned projector']['diagnosis']['cos'] == [pytest.approx(0.925)] * 4
    assert small['opd (sampled token)']['diagnosis']['kl'] == [0.5] * 4
    assert (small['sft (reference solutions)']['diagnosis']['mean_response_len']
            == [36.0, 34.0, 32.0, 30.1])
    assert res['bridges']['8']['heldout_cos'] == pytest.approx(0.6)

    # everything finished is reused, and the minutes are what the figures cost, not the rerun's
    fake.clear()
    study.jobs = 1
    again = study.run_study()
    assert again['main'] == res['main'] and fake == [] and again['minutes'] >= res['minutes'] > 0


def test_the_cross_tokenizer_block_trains_toward_its_own_teacher_and_writes_its_own_block(
        fake, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, 'xtok', True)
    res = study.run_xtok()
    runs = [dict(a[2:].split('=', 1) for a in args[1:] if a.startswith('--'))
            for args in fake if args[0] == 'distill.py']
    assert {r['teacher'] for r in runs} == {f'{tiny.work_dir}/xteacher'}
    assert {r['student'] for r in runs} == {'models/tiny/student'}
    # the cross-tokenizer teacher is made by its recipe; the shipped student is used as it is
    assert MADE == ['make_xteacher']
    assert all('/xstudy/' in r.get('out_dir', '') + r.get('bridge_path', '') for r in runs)
    fits = [r for r in runs if r['method'] == 'bridge_fit']
    assert sorted(r['bridge_rank'] for r in fits) == ['4', '8']
    assert {t['label'] for t in res['xtok']} == {
        'sft (reference solutions)', 'opd_chunk (sampled token, per chunk)', 'oprd_bridge (r = 4)',
        'oprd_bridge (r = 8)', 'oprd + learned projector, least-squares start',
        'opd_chunk + oprd_bridge (r = 4, µ = 1)'}
    # every rate's best is 1e-3, inside the grid: 3 rates at seed 0, then seeds 1 and 2, for each of
    # the 6 rows
    assert len(runs) - len(fits) == 6 * 3 + 6 * 2
    assert {r['method'] for r in runs} == {'bridge_fit', 'sft', 'opd_chunk', 'oprd_bridge', 'oprd',
                                           'opd_chunk+oprd_bridge'}
    results, readme = tmp_path / 'RESULTS.md', tmp_path / 'README.md'
    main_block = f"{study.BEGIN}\nthe main study\n{study.END}"
    results.write_text(f"# results\n\n{main_block}\n\n{study.XBEGIN}\nstale\n{study.XEND}\n")
    # no headline block: the cross-tokenizer block does not write one
    readme.write_text("# title\n")
    study.write_outputs(res, results=str(results), readme=str(readme),
                        figures=str(tmp_path / 'figures'))
    doc = results.read_text()
    assert main_block in doc and 'stale' not in doc and readme.read_text() == "# title\n"
    block = doc.split(study.XBEGIN)[1]
    assert ('| before | | 40.0 | |' in block
            and '| teacher (4 layers, d = 192) | | 97.0 | |' in block)
    # seeds 0, 1, 2 at step 60 on test: 0.85, 0.84, 0.83; (0.84 - 0.4) / (0.97 - 0.4) = 77% of the
    # gap
    assert ('| oprd_bridge (r = 4) | 0.0003: 84.8 · **0.001: 90.0** · 0.003: 85.2 | 84.0 ± 1.0 '
            '| +77% |') in block
    assert ('OPRD-Bridge (r = 4) here: 40.0 → 84.0 with the teacher at 97.0 (+77% of the gap)'
            in block and
            'AIME24 Avg@16): 2.8 → 5.0 with the teacher at 50.0 (+5% of the gap)' in block)
    assert json.loads((tmp_path / 'figures' / 'xstudy.json').read_text())['xtok'] == res['xtok']
    assert not (tmp_path / 'figures' / 'study.png').exists()


def test_a_rate_at_which_distill_stops_the_run_has_failed_and_is_not_chosen(fake, monkeypatch):
    """opd_chunk's run at 3e-3 ends with distill.py's own stop line (its rollouts left the
    teacher's tokenizer): that rate has no accuracy, shows as stopped, is not tried again by the
    next invocation, and 1e-3 is chosen. A run that stops at a chosen rate (the test seeds) still
    stops the study."""
    from lab import tables
    monkeypatch.setattr(study, 'xtok', True)
    faked = tiny.run_script
    stopped = []

    def stopping(args, log, **kw):
        if '--method=opd_chunk' in args and ('--lr=0.003' in args or '--lr=0.01' in args):
            stopped.append(args)
            with open(log, 'w') as f:
                f.write("step 44: loss -5.18\nerror: step 45: 33 of 64 rollouts have no text the "
                        "teacher's tokenizer reads as the student wrote it\n")
            raise RuntimeError(f"distill.py failed (exit 1); its whole output is in {log}")
        return faked(args, log, **kw)
    monkeypatch.setattr(tiny, 'run_script', stopping)
    res = study.run_xtok()
    chunk = next(t for t in res['xtok'] if t['label'] == 'opd_chunk (sampled token, per chunk)')
    assert chunk['val']['0.003'] is None and chunk['lr'] == '0.001' and len(stopped) == 1
    assert tables.rate_cell(chunk) == '0.0003: 84.8 · **0.001: 90.0** · 0.003: stopped'
    again = study.run_xtok()
    assert again['xtok'] == res['xtok'] and len(stopped) == 1
    row = next(r for r in study.XTOK if r.method == 'opd_chunk')
    with pytest.raises(RuntimeError, match="distill.py failed"):
        study.train(row, 1e-2, 1, ('test',))


def test_every_row_has_its_own_runs():
    """Run folders are named by row: two rows (or ablations) with one name would share each other's
    runs."""
    keys = [row.key for row in study.MAIN + study.SMALL] + [a[2].key for a in study.ABLATIONS]
    assert len(keys) == len(set(keys))


def test_tables_plot_and_both_blocks_are_written_from_the_results(fake, tmp_path, capsys):
    res = study.run_study()
    results, readme = tmp_path / 'RESULTS.md', tmp_path / 'README.md'
    results.write_text(f"# results\n\nbefore\n\n{study.BEGIN}\nstale\n{study.END}\n\nafter\n")
    readme.write_text(f"# title\n\n{study.HEADLINE_BEGIN}\nold\n{study.HEADLINE_END}\nrest\n")
    study.write_outputs(res, results=str(results), readme=str(readme),
                        figures=str(tmp_path / 'figures'))
    doc = results.read_text()
    assert (doc.startswith('# results\n\nbefore\n\n') and doc.endswith('\n\nafter\n')
            and 'stale' not in doc)
    block = doc[doc.index(study.BEGIN):doc.index(study.END) + len(study.END)]
    assert block == study.render(res)
    assert '| opd (sampled token) | 0.0003: ' in block and '**0.01: 90.0**' in block
    assert '| | µ = 10 | ' in block and '| 50.2 |' in block
    head = readme.read_text()
    assert head == f"# title\n\n{study.render_headline(res)}\nrest\n"
    # seeds 0, 1, 2 at step 60: 0.9, 0.89, 0.88, less 0.05 on test; (0.84 - 0.4) / (0.95 - 0.4) of
    # the gap
    assert '| opd (sampled token) | 0.01 | 84.0 ± 1.0 | +80% |' in head
    assert (tmp_path / 'figures' / 'study.png').read_bytes()[:4] == b'\x89PNG'
    assert json.loads((tmp_path / 'figures' / 'study.json').read_text())['main'] == res['main']
    # nothing is written when either document lacks its block
    readme.write_text('# no markers\n')
    with pytest.raises(SystemExit, match='no generated block'):
        study.write_outputs(res, results=str(results), readme=str(readme),
                            figures=str(tmp_path / 'figures'))
    assert results.read_text() == doc


def test_a_method_keeps_one_colour_in_both_panels(fake):
    import matplotlib.pyplot as plt
    from lab import plot
    fig = plot.draw(study.run_study())
    panels = [{line.get_label().rsplit(' (lr ', 1)[0]: line.get_color() for line in ax.get_lines()
               if line.get_label() != 'teacher'} for ax in fig.axes]
    plt.close(fig)
    shared = set(panels[0]) & set(panels[1])
    assert shared == {'opd (sampled token)', 'opd_topk (k = 16)', 'sft (reference solutions)'}
    assert all(panels[0][label] == panels[1][label] for label in shared)
    colours = {**panels[0], **panels[1]}
    assert len(set(map(str, colours.values()))) == len(colours)  # and no two methods share one


def generated_block(path, begin, end):
    with open(path) as f:
        doc = f.read()
    assert begin in doc and end in doc, f"{path} has lost its generated block"
    return doc[doc.index(begin):doc.index(end) + len(end)]


def test_results_and_readme_blocks_are_what_the_recorded_results_render():
    """RESULTS.md's tables and README's headline are generated: they equal render() and
    render_headline() of figures/study.json, written by the same run of python -m lab.study."""
    path = os.path.join(ROOT, study.FIGURES, 'study.json')
    assert os.path.isfile(path), (f"RESULTS.md's study block needs {path}, written with it by "
                                  "python -m lab.study")
    with open(path) as f:
        res = json.load(f)
    assert (generated_block(os.path.join(ROOT, study.RESULTS), study.BEGIN, study.END)
            == study.render(res))
    assert (generated_block(os.path.join(ROOT, study.README), study.HEADLINE_BEGIN,
                            study.HEADLINE_END)
            == study.render_headline(res))
    assert os.path.isfile(os.path.join(ROOT, study.FIGURES, 'study.png'))


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_study_runs_on_its_own_and_tiny_does_not_import_it():
    p = run_cli('-m', 'lab.study', '-h')
    assert (p.returncode == 0 and 'python -m lab.study' in p.stdout and '--jobs=2' in p.stdout
            and '--seeds=3' in p.stdout)
    p = run_cli('-m', 'lab.study', '--jobs=0')
    assert p.returncode == 2 and p.stderr.strip() == (
        "error: jobs and seeds must be at least 1 (got jobs=0, seeds=3)")
    p = run_cli('-c', 'import sys, tiny; assert "study" not in sys.modules')
    assert p.returncode == 0, p.stderr


def test_the_lag_block_runs_each_method_on_policy_and_one_step_behind_at_the_main_rates(
        fake, tmp_path, monkeypatch):
    monkeypatch.setattr(study, 'lag', True)
    res = study.run_lag()
    runs = [dict(a[2:].split('=', 1) for a in args[1:] if a.startswith('--'))
            for args in fake if args[0] == 'distill.py']
    # 4 methods x (on-policy, one step behind) + opd without its ratio, 3 seeds each
    assert len(runs) == 9 * 3 and all('/lagstudy/' in r['out_dir'] for r in runs)
    with open(os.path.join(ROOT, 'figures', 'study.json')) as f:
        chosen = {e['label']: e['lr'] for e in json.load(f)['main']}
    for label, method in study.LAG:
        mine = [r for r in runs if r['method'] == method]
        assert {r['lr'] for r in mine} == {chosen[label]}
        assert sorted(r.get('off_policy_steps', '0') for r in mine
                      if 'importance_cap' not in r) == ['0'] * 3 + ['1'] * 3
    no_ratio = [r for r in runs if r.get('importance_cap') == '0']
    assert len(no_ratio) == 3 and {(r['method'], r['off_policy_steps']) for r in no_ratio} == {
        ('opd', '1')}
    results = tmp_path / 'RESULTS.md'
    results.write_text(f"# results\n\n{study.LAG_BEGIN}\nstale\n{study.LAG_END}\n")
    study.write_outputs(res, results=str(results), readme=str(tmp_path / 'README.md'),
                        figures=str(tmp_path / 'figures'))
    block = results.read_text().split(study.LAG_BEGIN)[1]
    # fake_accuracy at step 60 on test: oprd at 3e-3, its best 1e-3: 0.9 - 0.1 log10(3) - 0.05,
    # minus 0.01 a seed: 80.2, 79.2, 78.2 either way
    assert '| oprd (0.003) | 79.2 ± 1.0 | 79.2 ± 1.0 | +0.0 |' in block
    # opd at 1e-4, its best 1e-2: 0.9 - 0.2 - 0.05 - 0.01 a seed
    assert '| opd without the importance ratio (0.0001) | | 64.0 ± 1.0 | +0.0 |' in block
    assert 'stale' not in block
    assert json.loads((tmp_path / 'figures' / 'lag.json').read_text())['lag'] == res['lag']
