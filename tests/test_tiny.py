"""tiny.py without its training: the recipe recorded beside the pair, a remake when it changes (never a silent
reuse), the validation split, the runner's filtered output (the quick start) and its quiet mode (lab/study.py), and
the accuracy helper's reuse. The SFT run is mocked; seconds."""

import json
import os

import pytest
from conftest import ROOT

import tiny


@pytest.fixture
def fake_sft(tmp_path, monkeypatch):
    """tiny.py in a temporary work_dir, its SFT run replaced by empty checkpoint folders at every 100th step."""
    calls = []

    def run_script(args, log, every=1, echo=True, threads=None):
        calls.append(args)
        out = next(a.split('=', 1)[1] for a in args if a.startswith('--out_dir='))
        assert not os.path.exists(out), f"distill.py would refuse {out}: it holds another run"
        for step in range(100, 1001, 100):
            os.makedirs(os.path.join(out, f'step_{step:07d}'))
            for name in ('config.json', 'resume.pt'):
                with open(os.path.join(out, f'step_{step:07d}', name), 'w') as f:
                    f.write('{"step": %d}' % step)

    monkeypatch.setattr(tiny, 'run_script', run_script)
    monkeypatch.setattr(tiny, 'make_init', lambda path, seed=0, **shape: os.makedirs(path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tiny, 'work_dir', 'tiny')  # relative, as the scripts' default
    return calls


def step_of(path):
    with open(os.path.join(path, 'config.json')) as f:
        return json.load(f)['step']


def test_pair_records_its_recipe_and_is_reused_only_unchanged(fake_sft, capsys):
    w = tiny.work_dir
    tiny.make_pair()
    assert len(fake_sft) == 1 and fake_sft[0][:2] == ['distill.py', 'config/tiny_sft.py']
    assert (step_of(f'{w}/student'), step_of(f'{w}/teacher')) == (tiny.student_step, tiny.teacher_step)
    assert not os.path.exists(f'{w}/student/resume.pt')
    with open(f'{w}/pair.json') as f:
        rec = json.load(f)
    assert rec['checkpoints'] == {'student': tiny.student_step, 'teacher': tiny.teacher_step}
    assert rec['init']['hidden_size'] == 128 and rec['init']['seed'] == 0
    assert rec['sft']['method'] == 'sft' and rec['sft']['lr'] == 3e-3 and rec['sft']['max_steps'] == 1000
    assert 'out_dir' not in rec['sft'] and rec['sft_data'] and rec['torch']
    capsys.readouterr()

    tiny.make_pair()  # the same recipe: reused, and said so
    assert len(fake_sft) == 1
    assert 'reused' in capsys.readouterr().out


def test_a_changed_recipe_remakes_the_pair_and_what_came_from_it(fake_sft, monkeypatch, tmp_path, capsys):
    w = tiny.work_dir
    tiny.make_pair()
    os.makedirs(f'{w}/eval/oprd_seed0')  # an evaluation of the old pair: must not outlive it
    capsys.readouterr()

    monkeypatch.setattr(tiny, 'student_step', 300)  # another checkpoint
    tiny.make_pair()
    out = capsys.readouterr().out.splitlines()
    assert len(fake_sft) == 2 and step_of(f'{w}/student') == 300 and not os.path.exists(f'{w}/eval')
    assert [line for line in out if 'remade' in line] == \
        [f"student, teacher: remade, the recipe changed since {w}/pair.json (checkpoints.student 500 -> 300)"]

    cfg = tmp_path / 'tiny_sft_other.py'  # another SFT learning rate
    cfg.write_text(open(os.path.join(ROOT, 'config', 'tiny_sft.py')).read() + 'lr = 2e-3\n')
    monkeypatch.setattr(tiny, 'SFT_CONFIG', str(cfg))
    tiny.make_pair()
    assert len(fake_sft) == 3 and fake_sft[-1][1] == str(cfg)
    assert 'sft.lr 0.003 -> 0.002' in capsys.readouterr().out

    monkeypatch.setitem(tiny.SHAPES, 'student', dict(tiny.SHAPES['student'], intermediate_size=256))
    tiny.make_pair()
    assert len(fake_sft) == 4 and 'init.intermediate_size 384 -> 256' in capsys.readouterr().out


def test_a_pair_without_a_record_is_never_reused(fake_sft, capsys):
    w = tiny.work_dir
    for who in ('student', 'teacher'):  # a pair from an older tiny.py: no pair.json beside it
        os.makedirs(f'{w}/{who}')
        open(f'{w}/{who}/config.json', 'w').write('{"step": 0}')
    tiny.make_pair()
    assert len(fake_sft) == 1 and step_of(f'{w}/student') == tiny.student_step
    assert 'no ' + f'{w}/pair.json records how they were made' in capsys.readouterr().out


def test_validation_split_is_disjoint_and_formatted_like_the_task(tmp_path):
    import data
    val = data.load_problems(tiny.write_val(str(tmp_path / 'val.jsonl'), n=64))
    assert len(val) == 64 and all(p['prompt'] == p['problem'] + '=?' for p in val)
    assert all(data.build_prompt(p) == p['prompt'] for p in val)  # the prompt the model sees: as in training
    used = {p['prompt'] for p in data.BUILTIN['tiny_train']() + data.BUILTIN['tiny']()}
    assert not used & {p['prompt'] for p in val}


def test_runner_shows_progress_not_chatter_and_logs_everything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tiny, 'verbose', False)
    lines = (['config: lr = 0.003', '(EngineCore pid=12) WARNING 11-28 20:19:51 [cpu.py:224] Triton is not installed.',
              'INFO 11-28 20:19:51 [core.py:1] engine started', 'method sft | student x'] +
             [f'step {i}: loss {1 / (i + 1):.3f}' for i in range(250)] + ['saved out/step_0000250', 'done: out'])
    script = tmp_path / 'noisy.py'
    script.write_text(f"import sys, warnings\nfor l in {lines!r}: print(l)\n"
                      "warnings.warn('deprecated', FutureWarning)\n")
    log = tmp_path / 'noisy.log'
    tiny.run_script([str(script)], str(log), every=100)
    shown = [line.strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert shown == ['method sft | student x', 'step 0: loss 1.000', 'step 99: loss 0.010', 'step 199: loss 0.005',
                     'step 249: loss 0.004', 'done: out']
    logged = log.read_text()
    assert all(line in logged for line in lines) and 'FutureWarning' in logged


def test_runner_failure_shows_the_log_tail_and_exits(tmp_path, capsys):
    script = tmp_path / 'fails.py'
    script.write_text("print('step 0: loss 1'); raise SystemExit('error: something broke')\n")
    with pytest.raises(SystemExit, match='failed'):
        tiny.run_script([str(script)], str(tmp_path / 'fails.log'))
    assert 'error: something broke' in capsys.readouterr().out


def test_runner_quiet_prints_nothing_and_sets_the_threads(tmp_path, monkeypatch, capsys):
    """lab/study.py's parallel runs: nothing on the terminal, everything in the log, one thread each, offline."""
    monkeypatch.setattr(tiny, 'verbose', False)
    script = tmp_path / 'env.py'
    script.write_text("import os\nprint('step 0: loss 1')\n"
                      "print('threads', os.environ['OMP_NUM_THREADS'], 'offline', os.environ['HF_HUB_OFFLINE'])\n")
    log = tmp_path / 'env.log'
    tiny.run_script([str(script)], str(log), echo=False, threads=1)
    assert capsys.readouterr().out == ''
    assert log.read_text() == 'step 0: loss 1\nthreads 1 offline 1\n'


def test_accuracy_runs_eval_unless_asked_to_reuse_its_summary(tmp_path, monkeypatch):
    calls = []

    def run_script(args, log, every=1, echo=True, threads=None):  # eval.py's part: a summary of its --out
        calls.append(args)
        out = next(a.split('=', 1)[1] for a in args if a.startswith('--out='))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, 'summary.json'), 'w') as f:
            json.dump({'tiny': {'avg@1': 0.25 * len(calls)}}, f)

    monkeypatch.setattr(tiny, 'run_script', run_script)
    out, log = str(tmp_path / 'eval' / 'x'), str(tmp_path / 'x.log')
    assert tiny.accuracy('ckpt', out, log) == 0.25
    assert calls[0][0] == 'eval.py' and '--ckpt=ckpt' in calls[0] and '--benchmarks=tiny' in calls[0]
    assert tiny.accuracy('ckpt', out, log) == 0.5  # the quick start: evaluated again
    assert tiny.accuracy('ckpt', out, log, reuse=True) == 0.5 and len(calls) == 2  # lab/study.py: read back


def test_the_teacher_across_tokenizers_is_a_llama_whose_bpe_merges_cross_digits_and_operators(tmp_path):
    """make_init of SHAPES['xteacher']: a Llama whose folder holds its own tokenizer (transformers loads both), a
    BPE whose tokens join digits with operators, newlines and spaces, and whose template ends a turn with <|end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import align
    from tokenizer import ByteTokenizer, load_tokenizer
    path = str(tmp_path / 'x')
    tiny.make_init(path, seed=2, **tiny.SHAPES['xteacher'])
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert hf.config.model_type == 'llama' and hf.config.hidden_size == 192 and hf.config.head_dim == 64
    tok, hf_tok = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert tok.vocab_size == len(hf_tok) == tiny.BPE_VOCAB == hf.config.vocab_size
    pieces = [tok.decode([i]) for i in tok.encode('37+48=85\n85-29=56\n\\boxed{56}')]
    assert ''.join(pieces) == '37+48=85\n85-29=56\n\\boxed{56}'
    assert any(any(c.isdigit() for c in p) and any(c in '+-=\n' for c in p) for p in pieces)
    assert tok.decode(tok.chat('1+2=?')) == '<|user|>1+2=?<|end|><|assistant|>'
    assert align.end_of_turn(tok) == hf_tok.convert_tokens_to_ids('<|end|>') and tok.eos_ids == [align.end_of_turn(tok)]
    align.check_tokenizers(ByteTokenizer(), tok)
