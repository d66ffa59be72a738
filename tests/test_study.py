"""study.py without training: the rate selection, the whole schedule against fake runs (rates widened at an edge,
seeds at the chosen rate, finished runs reused, validation and test kept apart), the tables, the plot, and
README's generated block. Seconds."""

import json
import os
import re

import pytest
from conftest import ROOT

import study
import tiny


def test_choose_rate_takes_the_best_and_a_tie_goes_to_the_smaller_rate():
    assert study.choose_rate({3e-4: 0.5, 1e-3: 0.9, 3e-3: 0.7}) == 1e-3
    assert study.choose_rate({3e-3: 0.9, 3e-4: 0.5, 1e-3: 0.9}) == 1e-3


def test_next_rate_widens_only_past_an_edge_and_stops_at_the_ladder_ends():
    assert study.next_rate({3e-4: 0.5, 1e-3: 0.9, 3e-3: 0.7}) is None
    assert study.next_rate({3e-4: 0.9, 1e-3: 0.8, 3e-3: 0.7}) == 1e-4
    assert study.next_rate({3e-4: 0.1, 1e-3: 0.8, 3e-3: 0.9}) == 1e-2
    assert study.next_rate({3e-4: 0.1, 1e-3: 0.8, 3e-3: 0.9, 1e-2: 0.8}) is None  # the widened rate was worse
    lo, hi = study.LADDER[0], study.LADDER[-1]
    assert study.next_rate({lo: 0.9, 3 * lo: 0.1}) is None and study.next_rate({hi / 3: 0.1, hi: 0.9}) is None


def fake_accuracy(ckpt, bench):
    """Accuracy as a function of the run: opd's best rate is 1e-2 (past the grid's top), every other one's 1e-3;
    the test split scores 0.05 below validation, an earlier step lower, seeds slightly apart."""
    if '/runs/' not in ckpt:
        return {'teacher': 0.95, 'student': 0.4, 'small': 0.3}[os.path.basename(ckpt)]
    m = re.search(r'/(student|small)-(.+)-lr([0-9.e-]+)-s(\d)/step_(\d+)', ckpt)
    row, lr, seed, step = m[2], float(m[3]), int(m[4]), int(m[5])
    best = 1e-2 if row.startswith('opd_sampled') else 1e-3
    acc = 0.9 - 0.1 * abs(__import__('math').log10(lr / best)) - 0.01 * seed - 0.001 * (60 - step)
    return acc - (0.05 if bench == 'tiny' else 0.0)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """study.py in a temporary work_dir; distill.py and eval.py replaced by writers of what they would leave."""
    monkeypatch.setattr(tiny, 'work_dir', str(tmp_path / 'tiny'))
    monkeypatch.setattr(tiny, 'make_pair', lambda: None)
    monkeypatch.setattr(tiny, 'make_small', lambda: None)
    calls = []

    def call(args, log):
        calls.append(args)
        kw = dict(a[2:].split('=', 1) for a in args[1:] if a.startswith('--'))
        if args[0] == 'eval.py':
            assert kw['benchmarks'] in ('tiny', study.here('val.jsonl'))
            os.makedirs(kw['out'])
            acc = fake_accuracy(kw['ckpt'], kw['benchmarks'])
            with open(os.path.join(kw['out'], 'summary.json'), 'w') as f:
                json.dump({kw['benchmarks']: {'avg@1': acc}}, f)
        elif kw['method'] == 'bridge_fit':
            os.makedirs(kw['bridge_path'])
            with open(os.path.join(kw['bridge_path'], 'bridge.json'), 'w') as f:
                json.dump({'heldout_cos': {'1': 0.5, '2': 0.7}, 'cos_by_rank_mean': {'4': 0.6, '64': 0.8}}, f)
        else:
            assert kw['backend'] == 'torch' and kw['max_steps'] == str(tiny.distill_steps)
            for s in range(study.EVAL_EVERY, tiny.distill_steps + 1, study.EVAL_EVERY):
                os.makedirs(os.path.join(kw['out_dir'], f'step_{s:07d}'))
            recs = [{'step': i, 'mean_response_len': 36.0 - i / 10, 'trunc_rate': 0.0} for i in range(60)]
            for r in recs:
                r.update({'cos/1': 0.9, 'cos/2': 0.95} if 'oprd' in kw['method'] else {'kl': 0.5})
            with open(os.path.join(kw['out_dir'], 'log.jsonl'), 'w') as f:
                f.write(''.join(json.dumps(r) + '\n' for r in recs))

    monkeypatch.setattr(study, 'call', call)
    return calls


def test_the_schedule_chooses_rates_on_validation_and_reports_seeds_on_test(fake, capsys):
    res = study.run_study(jobs=2)
    runs = [a for a in fake if a[0] == 'distill.py' and '--method=bridge_fit' not in a]
    fits = [a for a in fake if '--method=bridge_fit' in a]
    assert len(fits) == 3
    main = {t['label']: t for t in res['main']}
    small = {t['label']: t for t in res['small']}
    # opd's best is past the grid's top: widened to 1e-2, then 3e-2 (worse), and 1e-2 chosen; the others at 1e-3
    for t in (main['opd (sampled token)'], small['opd (sampled token)']):
        assert list(t['val']) == ['0.0003', '0.001', '0.003', '0.01', '0.03'] and t['lr'] == '0.01'
    assert all(t['lr'] == '0.001' and len(t['val']) == 3 for t in res['main'] + res['small']
               if not t['label'].startswith('opd (sampled'))
    # validation at seed 0 only; on test every seed, with a point per EVAL_EVERY steps plus the student before
    n_rows, n_seeds = len(study.MAIN) + len(study.SMALL), tiny.seeds
    assert len(runs) == n_rows * 3 + 2 * 2 + n_rows * (n_seeds - 1) + len(study.ABLATIONS) * n_seeds
    assert all(len(t['curves']) == n_seeds and len(t['curves'][0]) == 1 + tiny.distill_steps // study.EVAL_EVERY
               for t in res['main'] + res['small'])
    assert main['oprd']['curves'][0][0] == 0.4 and small['opd_topk (k = 16)']['curves'][0][0] == 0.3
    assert main['oprd']['curves'][1][-1] == pytest.approx(0.9 - 0.01 - 0.05)  # seed 1, last step, test split
    mu = [a for a in res['ablations'] if a['group'].startswith('µ')]
    assert [a['lr'] for a in mu] == [main['opd+oprd (µ = 1)']['lr']] * 3
    assert small['oprd + learned projector']['diagnosis']['cos'] == [pytest.approx(0.925)] * 4  # steps 0, 20, 40, 59
    assert small['opd (sampled token)']['diagnosis']['kl'] == [0.5] * 4
    assert small['sft (reference solutions)']['diagnosis']['mean_response_len'] == [36.0, 34.0, 32.0, 30.1]
    assert res['bridges']['8']['heldout_cos'] == pytest.approx(0.6)

    fake.clear()  # everything finished is reused, and the minutes are what the figures cost, not the rerun's
    again = study.run_study(jobs=1)
    assert again['main'] == res['main'] and fake == [] and again['minutes'] >= res['minutes'] > 0


def test_every_row_has_its_own_runs():
    """Run folders are named by row: two rows (or ablations) with one name would share each other's runs."""
    keys = [row.key for row in study.MAIN + study.SMALL] + [a[2].key for a in study.ABLATIONS]
    assert len(keys) == len(set(keys))


def test_tables_plot_and_readme_block_are_written_from_the_results(fake, tmp_path, capsys):
    res = study.run_study(jobs=2)
    readme = tmp_path / 'README.md'
    readme.write_text(f"# title\n\nbefore\n\n{study.BEGIN}\nstale\n{study.END}\n\nafter\n")
    study.write_outputs(res, readme=str(readme), figures=str(tmp_path / 'figures'))
    doc = readme.read_text()
    assert doc.startswith('# title\n\nbefore\n\n') and doc.endswith('\n\nafter\n') and 'stale' not in doc
    block = doc[doc.index(study.BEGIN):doc.index(study.END) + len(study.END)]
    assert block == study.render(res)
    assert '| opd (sampled token) | 0.0003: ' in block and '**0.01: 90.0**' in block
    assert '| | µ = 10 | ' in block and '| 50.2 |' in block
    assert (tmp_path / 'figures' / 'study.png').read_bytes()[:4] == b'\x89PNG'
    assert json.loads((tmp_path / 'figures' / 'study.json').read_text())['main'] == res['main']
    with pytest.raises(SystemExit, match='no study block'):
        readme.write_text('# no markers\n')
        study.write_outputs(res, readme=str(readme), figures=str(tmp_path / 'figures'))


def test_readme_study_block_is_what_the_recorded_results_render():
    """README's tables are generated: the block equals render() of figures/study.json, written by the same run."""
    path = os.path.join(ROOT, study.FIGURES, 'study.json')
    assert os.path.isfile(path), f"README's study block needs {path}, written with it by python tiny.py --study=True"
    with open(path) as f:
        res = json.load(f)
    with open(os.path.join(ROOT, 'README.md')) as f:
        doc = f.read()
    assert doc[doc.index(study.BEGIN):doc.index(study.END) + len(study.END)] == study.render(res)
    assert os.path.isfile(os.path.join(ROOT, study.FIGURES, 'study.png'))
