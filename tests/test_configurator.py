"""Tests for configurator.py: the apply_config function, and configure() as a script uses it
(run as a subprocess)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import ConfigError, apply_config

DEFAULTS = dict(batch_size=8, lr=1e-5, out_dir='out', ckpt='', layers='all', taps=[4, 8],
                shape=(2, 3), compile=False, seed=None)

def run(args, cfg=None):
    return apply_config(args, dict(DEFAULTS if cfg is None else cfg), verbose=False)

def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)

def test_key_eq_value_and_key_space_value():
    cfg = run(['--batch_size=16', '--lr', '3e-4', '--ckpt', 'out/'])
    assert cfg['batch_size'] == 16 and cfg['lr'] == 3e-4 and cfg['ckpt'] == 'out/'
    assert DEFAULTS['batch_size'] == 8  # the input dict is left alone

def test_config_file_then_override_in_order(tmp_path):
    f = write(tmp_path, 'c.py',
              "import math\n_tmp = 2\nbatch_size = 32\nlr = math.sqrt(4) * 1e-4\n")
    cfg = run([f, '--batch_size', '4'])
    assert cfg['batch_size'] == 4 and cfg['lr'] == 2e-4
    assert run(['--batch_size', '4', f])['batch_size'] == 32  # later wins

def test_key_value_does_not_take_a_config_file(tmp_path):
    f = write(tmp_path, 'c.py', "batch_size = 32\n")
    cfg = run(['--compile', f, '--lr', '1'])  # a bare bool flag leaves the file alone
    assert cfg['compile'] is True and cfg['batch_size'] == 32

def test_int_for_float():
    cfg = run(['--lr=1'])
    assert cfg['lr'] == 1.0 and isinstance(cfg['lr'], float)

@pytest.mark.parametrize('arg, words', [
    ('--lr=abc', ["'lr'", 'float', "'abc'"]),
    ('--batch_size=1.5', ["'batch_size'", 'int', "'1.5'"]),
    ('--batch_size=True', ["'batch_size'", 'int']),
    ('--compile=maybe', ["'compile'", 'bool', "'maybe'"]),
])
def test_wrong_type(arg, words):
    with pytest.raises(ConfigError) as e:
        run([arg])
    assert all(w in str(e.value) for w in words), str(e.value)

def test_config_file_values_are_type_checked(tmp_path):
    f = write(tmp_path, 'c.py', "batch_size = 'big'\n")
    with pytest.raises(ConfigError, match="'batch_size' expects int"):
        run([f])

def test_unknown_key_suggests():
    suggestion = r"unknown config key 'batchsize' \(did you mean 'batch_size'\?\)"
    with pytest.raises(ConfigError, match=suggestion):
        run(['--batchsize=4'])
    with pytest.raises(ConfigError, match="unknown config key 'zzz'$"):
        run(['--zzz', '1'])

def test_config_file_typo(tmp_path):
    f = write(tmp_path, 'typo.py', "learnign_rate = 1\n")
    with pytest.raises(ConfigError) as e:
        run([f], dict(learning_rate=1e-5))
    assert 'typo.py' in str(e.value)
    assert "'learnign_rate'" in str(e.value) and "'learning_rate'" in str(e.value)

def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match='nope.py'):
        run([str(tmp_path / 'nope.py')])

def test_missing_value():
    with pytest.raises(ConfigError, match='--lr needs a value'):
        run(['--lr', '--batch_size=2'])

def test_str_default_keeps_raw_string():
    cfg = run(['--layers', '3', '--out_dir=1e-3', '--ckpt', "'x'"])
    assert cfg['layers'] == '3' and cfg['out_dir'] == '1e-3' and cfg['ckpt'] == "'x'"

def test_none_default_takes_anything():
    assert run(['--seed=3'])['seed'] == 3
    assert run(['--seed', 'abc'])['seed'] == 'abc'

def test_lists():
    assert run(['--taps=[1, 2]'])['taps'] == [1, 2]
    # literal_eval gives a tuple; list default wins
    assert run(['--taps', '1,2,3'])['taps'] == [1, 2, 3]
    assert run(['--taps', 'a,b'])['taps'] == ['a', 'b']
    assert run(['--taps', '5'])['taps'] == [5]
    assert run(['--shape=[4, 5]'])['shape'] == (4, 5)

@pytest.mark.parametrize('args, want', [
    (['--compile'], True), (['--compile=True'], True), (['--compile', 'false'], False),
    (['--compile=1'], True), (['--compile', '0'], False), (['--compile', '--lr=1'], True),
])
def test_bools(args, want):
    assert run(args)['compile'] is want

def test_printing(capsys, monkeypatch):
    monkeypatch.delenv('RANK', raising=False)
    apply_config(['--lr=1e-4'], DEFAULTS)
    assert capsys.readouterr().out == 'config: lr = 0.0001 (was 1e-05)\n'
    monkeypatch.setenv('RANK', '1')
    apply_config(['--lr=1e-4'], DEFAULTS)
    assert capsys.readouterr().out == ''

# ----- configure(), as a script uses it -----

SCRIPT = """\
import sys
sys.path.insert(0, {root!r})
from configurator import configure
batch_size = 8
lr = 1e-5
ckpt = ''
config = configure(globals(), __file__)
# the globals updated
assert (batch_size, lr, ckpt) == (config['batch_size'], config['lr'], config['ckpt'])
print('result', config)
"""

def script(tmp_path, *args, rank=None):
    path = write(tmp_path, 'eval.py', SCRIPT.format(root=ROOT))
    env = {k: v for k, v in os.environ.items() if k != 'RANK'}
    if rank is not None:
        env['RANK'] = str(rank)
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path)

def test_script_applies_and_prints(tmp_path):
    f = write(tmp_path, 'c.py', 'batch_size = 16\n')
    p = script(tmp_path, f, '--ckpt', 'out/', '--lr=1e-4')
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        f'config: batch_size = 16 (was 8) from {f}',
        "config: ckpt = 'out/' (was '')",
        'config: lr = 0.0001 (was 1e-05)',
        "result {'batch_size': 16, 'lr': 0.0001, 'ckpt': 'out/'}",
    ]

def test_script_quiet_off_rank_0(tmp_path):
    p = script(tmp_path, '--lr=1e-4', rank=1)
    assert p.returncode == 0 and p.stdout == "result {'batch_size': 8, 'lr': 0.0001, 'ckpt': ''}\n"

def test_script_error_is_one_line(tmp_path):
    p = script(tmp_path, '--batchsize=1')
    assert p.returncode == 2 and p.stdout == ''
    assert p.stderr == "error: unknown config key 'batchsize' (did you mean 'batch_size'?)\n"
    p = script(tmp_path, 'missing.py')
    assert p.returncode == 2 and p.stderr == "error: config file not found: missing.py\n"
