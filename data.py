"""
The prompt side shared by training (distill.py) and evaluation (eval.py): benchmark loading and the
paper's prompt. Every problem is a dict {'id', 'problem', 'answer'} of strings (plus 'solution' and
'prompt' for the built-in tiny task).

    # benchmarks/aime24.jsonl, shipped with the repository
    problems = load_problems('aime24')
    # d/dapo17k.jsonl; without data_dir, the hub
    problems = load_problems('dapo17k', data_dir='d/')
    # the user message through the chat template
    ids = encode_prompt(problems[0], tok)

Sources, in order: the built-in tasks (BUILTIN), a .jsonl path, <data_dir>/<name>.jsonl,
<$OPRD_DATA_DIR>/<name>.jsonl, the evaluation sets shipped in benchmarks/ (aime24, aime25, aimo;
see benchmarks/README.md), then the hub by dataset id (BENCHMARKS) when online. Bad files give
one-line DataErrors naming the file and line.
"""
import hashlib
import json
import os
import random
import re
from pathlib import Path

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

def build_prompt(problem):
    """The user message: the problem, then the paper's instruction on its own line.

    A problem dict with its own 'prompt' (the built-in tiny task: short prompts for tiny
    models) uses that."""
    if isinstance(problem, dict):
        return problem.get('prompt') or build_prompt(problem['problem'])
    return problem.strip() + "\n" + INSTRUCTION

# -----------------------------------------------------------------------------
# data: every benchmark becomes a list of {'id', 'problem', 'answer'}, all str

# The built-in tiny task: chains of 2-digit additions and subtractions with a worked solution, e.g.
#   problem "37+48-29"  solution "37+48=85\n85-29=56\n\boxed{56}"  answer "56"
# generated deterministically; an expression belongs to the held-out split by a hash of its text, so
# the two splits never share a problem. 'tiny_train' has solutions (for sft) and 'tiny' is the
# held-out benchmark.

def tiny_problems(split, n, seed=0):
    rng = random.Random(f"tiny-{split}-{seed}")
    out, seen = [], set()
    while len(out) < n:
        steps = rng.choice((2, 3))
        value = rng.randint(10, 99)
        expr = str(value)
        lines = []
        for _ in range(steps):
            b = rng.randint(10, 99)
            op = '-' if value - b >= 0 and rng.random() < 0.5 else '+'
            new = value + b if op == '+' else value - b
            lines.append(f"{value}{op}{b}={new}")
            expr = f"{expr}{op}{b}"
            value = new
        held_out = int(hashlib.sha256(expr.encode()).hexdigest(), 16) % 10 == 0
        if held_out != (split == 'test') or expr in seen:
            continue
        seen.add(expr)
        out.append({'id': f"{split}-{len(out)}", 'problem': expr, 'prompt': f"{expr}=?",
                    'answer': str(value), 'solution': "\n".join(lines) + f"\n\\boxed{{{value}}}"})
    return out

# the evaluation sets' copies: <name>.jsonl
SHIPPED = Path(__file__).resolve().parent / 'benchmarks'
BENCHMARKS = {'aime24': 'HuggingFaceH4/aime_2024', 'aime25': 'MathArena/aime_2025',
              'aimo': 'AI-MO/aimo-validation-amc', 'dapo17k': 'BytedTsinghua-SIA/DAPO-Math-17k'}
# name -> callable returning the list of problems (synthetic tasks); consulted first
BUILTIN = {'tiny': lambda: tiny_problems('test', 256),
           'tiny_train': lambda: tiny_problems('train', 50_000)}

class DataError(ValueError):
    pass

def _num_str(x):
    """A JSON/hub number as an answer string: 142.0 -> '142'."""
    return str(int(x)) if float(x).is_integer() else str(x)

def read_jsonl(path):
    """One problem per line: 'problem' (or 'question'), 'answer' (str or number), optional 'id'
    and 'prompt' (the exact user message, as the built-in tiny task has; else build_prompt adds
    the paper's instruction)."""
    rows, seen = [], set()
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            problem = obj.get('problem', obj.get('question'))
            answer = obj.get('answer')
            if not isinstance(problem, str) or not problem.strip():
                raise DataError(f"{where}: needs a non-empty string field 'problem' "
                                "(or 'question')")
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = _num_str(answer)
            if not isinstance(answer, str) or not answer.strip():
                raise DataError(f"{where}: needs a field 'answer' (a string or a number)")
            pid = str(obj.get('id', len(rows)))  # no id: the row's index
            if pid in seen:
                raise DataError(f"{where}: duplicate id {pid!r}")
            seen.add(pid)
            row = {'id': pid, 'problem': problem, 'answer': answer.strip()}
            if isinstance(obj.get('prompt'), str) and obj['prompt'].strip():
                row['prompt'] = obj['prompt']
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no problems in it (an empty file)")
    return rows

def _strip_dapo_wrapper(text):
    # upstream prompt:
    #   "Solve the following math problem step by step. The last line ... "Answer:" ...\n\n
    #   <problem>\n\nRemember to put your answer on its own line after "Answer:"."
    # -> keep <problem>
    parts = text.split('\n\n')
    if (len(parts) >= 3 and parts[0].startswith('Solve the following')
            and parts[-1].startswith('Remember')):
        return '\n\n'.join(parts[1:-1]).strip()
    return text.strip()

def _load_hub(name):
    """Map each hub dataset's columns to id/problem/answer,
    ids as in benchmarks/ (e.g. '2024-I-1')."""
    try:
        import datasets  # lazy: only needed online
    except ImportError:
        raise DataError(f"loading {name!r} from the hub ({BENCHMARKS[name]}) needs the "
                        "`datasets` package (pip install datasets), "
                        f"or pass --data_dir=<folder with {name}.jsonl>") from None
    try:
        ds = datasets.load_dataset(BENCHMARKS[name], split='train')
    except Exception as e:  # offline, unknown or gated dataset
        first_line = str(e).splitlines()[0] if str(e) else ''
        raise DataError(f"could not load {name!r} ({BENCHMARKS[name]}) from the hub: "
                        f"{type(e).__name__}: {first_line} (or pass --data_dir)") from None
    rows, seen = [], set()
    for i, r in enumerate(ds):
        if name == 'dapo17k':
            # the file repeats its ~17.9k prompts 100x; keep the first copy of each index
            key = (r.get('extra_info') or {}).get('index') or r['prompt'][-1]['content']
            if key in seen:
                continue
            seen.add(key)
            rows.append({'id': str(len(rows)),
                         'problem': _strip_dapo_wrapper(r['prompt'][-1]['content']),
                         'answer': str(r['reward_model']['ground_truth']).strip()})
            continue
        if name == 'aime25':
            # problem_idx 1..15 is AIME I, 16..30 is AIME II
            k = int(r['problem_idx'])
            pid = f"2025-I-{k}" if k <= 15 else f"2025-II-{k - 15}"
        else:
            # aime24, aimo: the AoPS url names the contest, e.g. .../2022_AMC_12A_Problems/Problem_1
            url = r.get('url') or ''
            contest = re.search(r'(\d{4})_(?:AIME|AMC)_(\w+?)_Problems/Problem_(\d+)', url)
            pid = f"{contest[1]}-{contest[2]}-{contest[3]}" if contest else str(r.get('id', i))
        answer = r['answer']
        rows.append({'id': pid, 'problem': r['problem'],
                     'answer': answer.strip() if isinstance(answer, str) else _num_str(answer)})
    return rows

def load_problems(name_or_path, data_dir=None):
    """Problems of a benchmark: BUILTIN, a .jsonl path, <data_dir>/<name>.jsonl, $OPRD_DATA_DIR, the
    copies shipped in benchmarks/, then the hub (if online)."""
    name = str(name_or_path)
    if name in BUILTIN:
        return BUILTIN[name]()
    if name.endswith('.jsonl'):
        if not Path(name).is_file():
            raise FileNotFoundError(f"no such file: {name}")
        return read_jsonl(name)
    if data_dir:  # asked for explicitly: the file must be there
        if not Path(data_dir).is_dir():
            raise DataError(f"data_dir {data_dir!r} is not a folder")
        if not (Path(data_dir) / f"{name}.jsonl").is_file():
            raise DataError(f"no {name}.jsonl in data_dir {data_dir!r} "
                            f"(benchmark {name!r} is read from <data_dir>/{name}.jsonl)")
        return read_jsonl(Path(data_dir) / f"{name}.jsonl")
    data_dir = os.environ.get('OPRD_DATA_DIR')
    if data_dir and (Path(data_dir) / f"{name}.jsonl").is_file():
        return read_jsonl(Path(data_dir) / f"{name}.jsonl")
    if (SHIPPED / f"{name}.jsonl").is_file():
        return read_jsonl(SHIPPED / f"{name}.jsonl")
    if name not in BENCHMARKS:
        known = sorted(BENCHMARKS) + sorted(BUILTIN)
        raise ValueError(f"unknown benchmark {name!r}: not a .jsonl file, "
                         f"not in data_dir={data_dir!r}, and not one of {', '.join(known)}")
    if os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on'):
        raise FileNotFoundError(f"benchmark {name!r} ({BENCHMARKS[name]}) is not available "
                                f"offline: pass --data_dir=<folder with {name}.jsonl> "
                                "or set OPRD_DATA_DIR")
    return _load_hub(name)


def encode_prompt(problem, tok, enable_thinking=False):
    """Token ids of a problem's prompt: the user message of build_prompt through
    the chat template."""
    return tok.chat(build_prompt(problem), enable_thinking=enable_thinking)
