"""tiny.py: the shipped models (they load, and their recorded recipe is the code's), the recipe run
for real at a few steps, the remake and reuse rules with the SFT run mocked, the quick start on the
shipped pair (no SFT run), the validation split, the runner's filtered output (the quick start) and
its quiet mode (lab/study.py), and the accuracy helper's reuse. Seconds, the recipe run about
ten."""

import json
import os

import pytest
from conftest import ROOT

import tiny


@pytest.fixture
def fake_sft(tmp_path, monkeypatch):
    """tiny.py in a temporary work_dir and a temporary models folder, its SFT run replaced by empty
    checkpoint folders at every 100th step."""
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

    def make_init(path, seed=0, **shape):
        os.makedirs(path)

    monkeypatch.setattr(tiny, 'run_script', run_script)
    monkeypatch.setattr(tiny, 'make_init', make_init)
    monkeypatch.chdir(tmp_path)
    # relative, as the scripts' default
    monkeypatch.setattr(tiny, 'work_dir', 'tiny')
    monkeypatch.setattr(tiny, 'MODELS', str(tmp_path / 'models'))
    return calls


def step_of(path):
    with open(os.path.join(path, 'config.json')) as f:
        return json.load(f)['step']


# ----------------------------------------------------------------------------- the shipped models

SHIPPED = (('student', tiny.pair_models), ('teacher', tiny.pair_models),
           ('small', tiny.small_models))


@pytest.mark.parametrize('who, models', SHIPPED)
def test_the_shipped_models_load_as_hf_checkpoints_of_their_shape(who, models):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from tokenizer import ByteTokenizer, load_tokenizer
    path = os.path.join(tiny.MODELS, who)
    assert sorted(os.listdir(path)) == ['config.json', 'model.safetensors']
    config = AutoConfig.from_pretrained(path)
    shape = models().shape
    assert config.model_type == 'qwen3'
    assert all(getattr(config, key) == value for key, value in shape.items())
    weights = load_file(os.path.join(path, 'model.safetensors'))
    embedding = weights['model.embed_tokens.weight']
    assert embedding.shape == (config.vocab_size, shape['hidden_size'])
    assert isinstance(load_tokenizer(path), ByteTokenizer)


@pytest.mark.parametrize('models', [tiny.pair_models, tiny.small_models])
def test_the_shipped_models_are_their_recipes(models):
    """pair.json and small.json record what recipe() records for this code, so the shipped models
    are the recipe's. torch's version is recorded for the reader and left out here: the suite also
    runs on GPU nodes, whose torch build is another."""
    with open(models().record()) as f:
        recorded = json.load(f)
    want = models().recipe()
    recorded.pop('torch')
    want.pop('torch')
    assert tiny.changes(recorded, want) == []


def test_the_recipe_runs_for_real_at_a_few_steps(tmp_path, monkeypatch, capsys):
    """make_models end to end with distill.py's SFT run, 4 steps: the checkpoints kept, without
    their resume state, and the recipe recorded beside them and beside the run."""
    from transformers import AutoConfig
    monkeypatch.setattr(tiny, 'work_dir', str(tmp_path / 'tiny'))
    os.makedirs(tiny.work_dir)
    sft_args = ('--max_steps=4', '--save_every=2', '--keep_checkpoints=2', '--prompts_per_step=8',
                '--micro_batch_size=8')
    models = tiny.Models('few', tiny.SHAPES['small'], 1, {'early': 2, 'late': 4},
                         str(tmp_path / 'models'), sft_args)
    tiny.make_models(models)
    for who in ('early', 'late'):
        folder = tmp_path / 'models' / who
        assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']
        assert AutoConfig.from_pretrained(folder).hidden_size == 64
    with open(models.record()) as f:
        recorded = json.load(f)
    assert recorded == models.recipe() and recorded['sft']['max_steps'] == 4
    with open(tmp_path / 'tiny' / 'sft_few.json') as f:
        assert json.load(f) == recorded
    assert 'made by their recipe' in capsys.readouterr().out


# ----------------------------------------------------------------------------- remake and reuse

def test_remaking_the_pair_writes_the_models_and_their_recipe(fake_sft):
    w = tiny.work_dir
    tiny.make_pair()
    assert len(fake_sft) == 1 and fake_sft[0][:2] == ['distill.py', 'config/tiny_sft.py']
    student = os.path.join(tiny.MODELS, 'student')
    teacher = os.path.join(tiny.MODELS, 'teacher')
    assert (step_of(student), step_of(teacher)) == (tiny.student_step, tiny.teacher_step)
    assert not os.path.exists(os.path.join(student, 'resume.pt'))
    with open(os.path.join(tiny.MODELS, 'pair.json')) as f:
        rec = json.load(f)
    assert rec['checkpoints'] == {'student': tiny.student_step, 'teacher': tiny.teacher_step}
    assert rec['init']['hidden_size'] == 128 and rec['init']['seed'] == 0
    assert rec['sft']['method'] == 'sft' and rec['sft']['lr'] == 3e-3
    assert rec['sft']['max_steps'] == 1000
    assert 'out_dir' not in rec['sft'] and rec['sft_data'] and rec['torch']
    with open(f'{w}/sft_pair.json') as f:
        assert json.load(f) == rec

    # asked again: made again, whatever the record says
    os.makedirs(f'{w}/eval/oprd_seed0')
    tiny.make_pair()
    assert len(fake_sft) == 2 and not os.path.exists(f'{w}/eval')


def test_models_made_with_reuse_are_kept_only_while_their_recipe_holds(fake_sft, monkeypatch,
                                                                       tmp_path, capsys):
    """The rule of the cross-tokenizer teacher (make_models with reuse), on the pair's recipe."""
    w = tiny.work_dir
    tiny.make_models(tiny.pair_models(), reuse=True)
    assert len(fake_sft) == 1
    # an evaluation of the old pair: must not outlive it
    os.makedirs(f'{w}/eval/oprd_seed0')
    capsys.readouterr()

    tiny.make_models(tiny.pair_models(), reuse=True)
    assert len(fake_sft) == 1 and 'reused' in capsys.readouterr().out

    # another checkpoint
    monkeypatch.setattr(tiny, 'student_step', 300)
    tiny.make_models(tiny.pair_models(), reuse=True)
    out = capsys.readouterr().out.splitlines()
    assert len(fake_sft) == 2 and step_of(os.path.join(tiny.MODELS, 'student')) == 300
    assert not os.path.exists(f'{w}/eval')
    record = os.path.join(tiny.MODELS, 'pair.json')
    assert [line for line in out if 'remade' in line] == [
        f"student, teacher: remade, the recipe changed since {record} "
        "(checkpoints.student 500 -> 300)"]

    # another SFT learning rate
    cfg = tmp_path / 'tiny_sft_other.py'
    cfg.write_text(open(os.path.join(ROOT, 'config', 'tiny_sft.py')).read() + 'lr = 2e-3\n')
    monkeypatch.setattr(tiny, 'SFT_CONFIG', str(cfg))
    tiny.make_models(tiny.pair_models(), reuse=True)
    assert len(fake_sft) == 3 and fake_sft[-1][1] == str(cfg)
    assert 'sft.lr 0.003 -> 0.002' in capsys.readouterr().out

    wider = dict(tiny.SHAPES['student'], intermediate_size=256)
    monkeypatch.setitem(tiny.SHAPES, 'student', wider)
    tiny.make_models(tiny.pair_models(), reuse=True)
    assert len(fake_sft) == 4
    assert 'init.intermediate_size 384 -> 256' in capsys.readouterr().out


def test_models_without_a_record_are_never_reused(fake_sft, capsys):
    # a pair from an older tiny.py: no pair.json beside it
    for who in ('student', 'teacher'):
        os.makedirs(os.path.join(tiny.MODELS, who))
        with open(os.path.join(tiny.MODELS, who, 'config.json'), 'w') as f:
            f.write('{"step": 0}')
    tiny.make_models(tiny.pair_models(), reuse=True)
    assert len(fake_sft) == 1
    assert step_of(os.path.join(tiny.MODELS, 'student')) == tiny.student_step
    record = os.path.join(tiny.MODELS, 'pair.json')
    assert f'no {record} records how they were made' in capsys.readouterr().out


def test_the_quick_start_distils_the_shipped_pair_without_making_it(tmp_path, monkeypatch,
                                                                    capsys):
    """No SFT run: the student and the teacher evaluated from models/tiny, OPRD from its student;
    the printed block's format."""
    calls = []

    def run_script(args, log, every=1, echo=True, threads=None):
        calls.append(args)
        kw = dict(a[2:].split('=', 1) for a in args[1:] if a.startswith('--'))
        if args[0] == 'eval.py':
            os.makedirs(kw['out'], exist_ok=True)
            name = os.path.basename(kw['ckpt'])
            acc = {'student': 0.5, 'teacher': 1.0}.get(name, 0.9)
            with open(os.path.join(kw['out'], 'summary.json'), 'w') as f:
                json.dump({'tiny': {'avg@1': acc}}, f)
        else:
            os.makedirs(os.path.join(kw['out_dir'], 'step_0000060'))

    monkeypatch.setattr(tiny, 'run_script', run_script)
    monkeypatch.setattr(tiny, 'work_dir', str(tmp_path / 'tiny'))
    monkeypatch.setattr(tiny, 'remake', False)
    tiny.quick_start()
    assert [args[0] for args in calls] == ['eval.py', 'eval.py', 'distill.py', 'eval.py']
    assert '--ckpt=models/tiny/student' in calls[0] and '--ckpt=models/tiny/teacher' in calls[1]
    assert ('--student=models/tiny/student' in calls[2]
            and '--teacher=models/tiny/teacher' in calls[2])
    lines = capsys.readouterr().out.splitlines()
    assert 'note:' not in '\n'.join(lines)
    assert lines[-5:-1] == ["tiny task, greedy accuracy on 256 held-out problems:",
                            "  student before    50.0%",
                            "  teacher          100.0%",
                            "  student + OPRD    90.0%   (80% of the teacher-student gap closed in "
                            "60 steps)"]
    assert lines[-1].endswith(' minutes in all')


def test_missing_shipped_models_are_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny, 'MODELS', str(tmp_path / 'models'))
    with pytest.raises(SystemExit, match='student/config.json is missing.*--remake=True'):
        tiny.check_shipped(tiny.pair_models())


# ----------------------------------------------------------------------------- the helpers

def test_validation_split_is_disjoint_and_formatted_like_the_task(tmp_path):
    import data
    val = data.load_problems(tiny.write_val(str(tmp_path / 'val.jsonl'), n=64))
    assert len(val) == 64 and all(p['prompt'] == p['problem'] + '=?' for p in val)
    # the prompt the model sees: as in training
    assert all(data.build_prompt(p) == p['prompt'] for p in val)
    used = {p['prompt'] for p in data.BUILTIN['tiny_train']() + data.BUILTIN['tiny']()}
    assert not used & {p['prompt'] for p in val}


def test_runner_shows_progress_not_chatter_and_logs_everything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tiny, 'verbose', False)
    lines = ['config: lr = 0.003',
             '(EngineCore pid=12) WARNING 11-28 20:19:51 [cpu.py:224] Triton is not installed.',
             'INFO 11-28 20:19:51 [core.py:1] engine started',
             'method sft | student x']
    lines += [f'step {i}: loss {1 / (i + 1):.3f}' for i in range(250)]
    lines += ['saved out/step_0000250', 'done: out']
    script = tmp_path / 'noisy.py'
    script.write_text(f"import sys, warnings\nfor l in {lines!r}: print(l)\n"
                      "warnings.warn('deprecated', FutureWarning)\n")
    log = tmp_path / 'noisy.log'
    tiny.run_script([str(script)], str(log), every=100)
    shown = [line.strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert shown == ['method sft | student x', 'step 0: loss 1.000', 'step 99: loss 0.010',
                     'step 199: loss 0.005', 'step 249: loss 0.004', 'done: out']
    logged = log.read_text()
    assert all(line in logged for line in lines) and 'FutureWarning' in logged


def test_runner_failure_shows_the_log_tail_and_exits(tmp_path, capsys):
    script = tmp_path / 'fails.py'
    script.write_text("print('step 0: loss 1')\nraise SystemExit('error: something broke')\n")
    with pytest.raises(SystemExit, match='failed'):
        tiny.run_script([str(script)], str(tmp_path / 'fails.log'))
    assert 'error: something broke' in capsys.readouterr().out


def test_runner_quiet_prints_nothing_and_sets_the_threads(tmp_path, monkeypatch, capsys):
    """lab/study.py's parallel runs: nothing on the terminal, everything in the log, one thread
    each, offline."""
    monkeypatch.setattr(tiny, 'verbose', False)
    script = tmp_path / 'env.py'
    script.write_text("import os\nprint('step 0: loss 1')\n"
                      "print('threads', os.environ['OMP_NUM_THREADS'], "
                      "'offline', os.environ['HF_HUB_OFFLINE'])\n")
    log = tmp_path / 'env.log'
    tiny.run_script([str(script)], str(log), echo=False, threads=1)
    assert capsys.readouterr().out == ''
    assert log.read_text() == 'step 0: loss 1\nthreads 1 offline 1\n'


def test_accuracy_runs_eval_unless_asked_to_reuse_its_summary(tmp_path, monkeypatch):
    calls = []

    # eval.py's part: a summary of its --out
    def run_script(args, log, every=1, echo=True, threads=None):
        calls.append(args)
        out = next(a.split('=', 1)[1] for a in args if a.startswith('--out='))
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, 'summary.json'), 'w') as f:
            json.dump({'tiny': {'avg@1': 0.25 * len(calls)}}, f)

    monkeypatch.setattr(tiny, 'run_script', run_script)
    out = str(tmp_path / 'eval' / 'x')
    log = str(tmp_path / 'x.log')
    assert tiny.accuracy('ckpt', out, log) == 0.25
    assert calls[0][0] == 'eval.py' and '--ckpt=ckpt' in calls[0]
    assert '--benchmarks=tiny' in calls[0]
    # the quick start: evaluated again
    assert tiny.accuracy('ckpt', out, log) == 0.5
    # lab/study.py: read back
    assert tiny.accuracy('ckpt', out, log, reuse=True) == 0.5 and len(calls) == 2


def test_the_cross_tokenizer_teacher_is_a_llama_whose_bpe_merges_digits_and_operators(tmp_path):
    """make_init of SHAPES['xteacher']: a Llama whose folder holds its own tokenizer (transformers
    loads both), a BPE whose tokens join digits with operators, newlines and spaces, and whose
    template ends a turn with <|end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import align
    from tokenizer import ByteTokenizer, load_tokenizer
    path = str(tmp_path / 'x')
    tiny.make_init(path, seed=2, **tiny.SHAPES['xteacher'])
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert hf.config.model_type == 'llama' and hf.config.hidden_size == 192
    assert hf.config.head_dim == 64
    tok = load_tokenizer(path)
    hf_tok = AutoTokenizer.from_pretrained(path)
    assert tok.vocab_size == len(hf_tok) == tiny.BPE_VOCAB == hf.config.vocab_size
    text = '37+48=85\n85-29=56\n\\boxed{56}'
    pieces = [tok.decode([i]) for i in tok.encode(text)]
    assert ''.join(pieces) == text
    assert any(any(c.isdigit() for c in p) and any(c in '+-=\n' for c in p) for p in pieces)
    assert tok.decode(tok.chat('1+2=?')) == '<|user|>1+2=?<|end|><|assistant|>'
    end = hf_tok.convert_tokens_to_ids('<|end|>')
    assert align.end_of_turn(tok) == end and tok.eos_ids == [end]
    align.check_tokenizers(ByteTokenizer(), tok)
