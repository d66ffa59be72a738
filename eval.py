"""
Standalone evaluator on AIME 2024, AIME 2025 and AIMO (the OPRD paper's protocol, METHOD.md §6):
16 samples per problem at temperature 0.7 / top-p 0.95, the last \\boxed{...} graded against the gold answer,
reported as Avg@16, Best@16, pass@k, maj@16, Dist-4g, mean response length and truncation rate.

$ python eval.py --ckpt=out                                   # the three benchmarks, from the hub
$ python eval.py --ckpt=out --data_dir=../shared/bench        # offline, from <data_dir>/<name>.jsonl
$ python eval.py --ckpt=out --benchmarks=aime24 --limit=5 --n_samples=2   # a quick look

The top half of this file (data, grading, metrics, output) imports without torch, so tests and bench.py
use it directly; main() at the bottom does the generation.
"""
import json
import math
import os
import re
import threading
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

# -----------------------------------------------------------------------------
# default config values, overridden by a config file or --key=value on the command line
ckpt = 'out'                  # checkpoint folder (or a hub model id) to evaluate
benchmarks = 'aime24,aime25,aimo'
data_dir = ''                 # folder of <name>.jsonl; '' = $OPRD_DATA_DIR, then the hub
n_samples = 16
temperature = 0.7
top_p = 0.95
top_k = -1                    # -1 = off
max_new_tokens = 31744
enable_thinking = False       # chat template flag; the paper evaluates with thinking disabled
seed = 0
backend = 'auto'              # 'auto' (vLLM where it imports) | 'vllm' | 'torch'
out = ''                      # output folder for summary.json and samples.jsonl; '' = don't write
limit = 0                     # >0: only the first `limit` problems of each benchmark
batch_problems = 32           # problems per generate() call (the progress bar's unit)
max_prompt_tokens = 2048      # the engine's context is this plus max_new_tokens
# -----------------------------------------------------------------------------

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

def build_prompt(problem):
    """The user message: the problem, then the paper's instruction on its own line.

    A problem dict with its own 'prompt' (the built-in tiny task: short prompts for tiny models) uses that."""
    if isinstance(problem, dict):
        return problem.get('prompt') or build_prompt(problem['problem'])
    return problem.strip() + "\n" + INSTRUCTION

# -----------------------------------------------------------------------------
# data: every benchmark becomes a list of {'id', 'problem', 'answer'}, all str

# The built-in tiny task: chains of 2-digit additions and subtractions with a worked solution, e.g.
#   problem "37+48-29"  solution "37+48=85\n85-29=56\n\boxed{56}"  answer "56"
# generated deterministically; an expression belongs to the held-out split by a hash of its text, so the two
# splits never share a problem. 'tiny_train' has solutions (for sft) and 'tiny' is the held-out benchmark.

def tiny_problems(split, n, seed=0):
    import hashlib
    import random
    rng = random.Random(f"tiny-{split}-{seed}")
    out, seen = [], set()
    while len(out) < n:
        steps = rng.choice((2, 3))
        value = rng.randint(10, 99)
        expr, lines = str(value), []
        for _ in range(steps):
            b = rng.randint(10, 99)
            op = '-' if value - b >= 0 and rng.random() < 0.5 else '+'
            new = value + b if op == '+' else value - b
            lines.append(f"{value}{op}{b}={new}")
            expr, value = f"{expr}{op}{b}", new
        held_out = int(hashlib.sha256(expr.encode()).hexdigest(), 16) % 10 == 0
        if held_out != (split == 'test') or expr in seen:
            continue
        seen.add(expr)
        out.append({'id': f"{split}-{len(out)}", 'problem': expr, 'prompt': f"{expr}=?", 'answer': str(value),
                    'solution': "\n".join(lines) + f"\n\\boxed{{{value}}}"})
    return out

BENCHMARKS = {'aime24': 'HuggingFaceH4/aime_2024', 'aime25': 'MathArena/aime_2025',
              'aimo': 'AI-MO/aimo-validation-amc', 'dapo17k': 'BytedTsinghua-SIA/DAPO-Math-17k'}
# name -> callable returning the list of problems (synthetic tasks); consulted first
BUILTIN = {'tiny': lambda: tiny_problems('test', 256), 'tiny_train': lambda: tiny_problems('train', 50_000)}

class DataError(ValueError):
    pass

def _num_str(x):
    """A JSON/hub number as an answer string: 142.0 -> '142'."""
    return str(int(x)) if float(x).is_integer() else str(x)

def read_jsonl(path):
    """One problem per line: 'problem' (or 'question'), 'answer' (str or number), optional 'id'."""
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
                raise DataError(f"{where}: needs a non-empty string field 'problem' (or 'question')")
            if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                answer = _num_str(answer)
            if not isinstance(answer, str) or not answer.strip():
                raise DataError(f"{where}: needs a field 'answer' (a string or a number)")
            pid = str(obj.get('id', len(rows)))  # no id: the row's index
            if pid in seen:
                raise DataError(f"{where}: duplicate id {pid!r}")
            seen.add(pid)
            rows.append({'id': pid, 'problem': problem, 'answer': answer.strip()})
    return rows

def _strip_dapo_wrapper(text):
    # upstream prompt: "Solve the following math problem step by step. The last line ... "Answer:" ...\n\n
    # <problem>\n\nRemember to put your answer on its own line after "Answer:"." -> keep <problem>
    parts = text.split('\n\n')
    if len(parts) >= 3 and parts[0].startswith('Solve the following') and parts[-1].startswith('Remember'):
        return '\n\n'.join(parts[1:-1]).strip()
    return text.strip()

def _load_hub(name):
    """Map each hub dataset's columns to id/problem/answer, ids as in shared/bench (e.g. '2024-I-1')."""
    import datasets  # lazy: only needed online
    ds = datasets.load_dataset(BENCHMARKS[name], split='train')
    rows, seen = [], set()
    for i, r in enumerate(ds):
        if name == 'dapo17k':  # the file repeats its ~17.9k prompts 100x; keep the first copy of each index
            key = (r.get('extra_info') or {}).get('index') or r['prompt'][-1]['content']
            if key in seen:
                continue
            seen.add(key)
            rows.append({'id': str(len(rows)), 'problem': _strip_dapo_wrapper(r['prompt'][-1]['content']),
                         'answer': str(r['reward_model']['ground_truth']).strip()})
            continue
        if name == 'aime25':  # problem_idx 1..15 is AIME I, 16..30 is AIME II
            k = int(r['problem_idx'])
            pid = f"2025-I-{k}" if k <= 15 else f"2025-II-{k - 15}"
        else:  # aime24, aimo: the AoPS url names the contest, e.g. .../2022_AMC_12A_Problems/Problem_1
            m = re.search(r'(\d{4})_(?:AIME|AMC)_(\w+?)_Problems/Problem_(\d+)', r.get('url') or '')
            pid = f"{m[1]}-{m[2]}-{m[3]}" if m else str(r.get('id', i))
        a = r['answer']
        rows.append({'id': pid, 'problem': r['problem'], 'answer': a.strip() if isinstance(a, str) else _num_str(a)})
    return rows

def load_problems(name_or_path, data_dir=None):
    """Problems of a benchmark: BUILTIN, a .jsonl path, <data_dir>/<name>.jsonl, then the hub (if online)."""
    name = str(name_or_path)
    if name in BUILTIN:
        return BUILTIN[name]()
    if name.endswith('.jsonl'):
        if not Path(name).is_file():
            raise FileNotFoundError(f"no such file: {name}")
        return read_jsonl(name)
    data_dir = data_dir or os.environ.get('OPRD_DATA_DIR')
    if data_dir and (Path(data_dir) / f"{name}.jsonl").is_file():
        return read_jsonl(Path(data_dir) / f"{name}.jsonl")
    if name not in BENCHMARKS:
        known = sorted(BENCHMARKS) + sorted(BUILTIN)
        raise ValueError(f"unknown benchmark {name!r}: not a .jsonl file, not in data_dir={data_dir!r}, "
                         f"and not one of {', '.join(known)}")
    if os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on'):
        raise FileNotFoundError(f"benchmark {name!r} ({BENCHMARKS[name]}) is not available offline: pass "
                                f"--data_dir=<folder with {name}.jsonl> (e.g. shared/bench) or set OPRD_DATA_DIR")
    return _load_hub(name)

# -----------------------------------------------------------------------------
# grading: pure string work, plus sympy on a whitelisted string; model text is never eval'd or exec'd

def extract_answer(text):
    """Content of the last \\boxed{...} / \\fbox{...} (balanced braces) or \\boxed <token>; else None."""
    matches = list(re.finditer(r'\\(?:boxed|fbox)(?![A-Za-z])', text or ''))
    if not matches:
        return None
    i = matches[-1].end()
    if text[i:i + 1] != '{':  # "\boxed 5": one token
        m = re.match(r'\s+([^\s$]+)', text[i:])
        return m[1] if m else None
    depth = 0
    for j in range(i, len(text)):
        depth += {'{': 1, '}': -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: e.g. the response was cut off inside the box

_FRAC = re.compile(r'\\frac\s*(\{[^{}]*\}|[0-9A-Za-z])\s*(\{[^{}]*\}|[0-9A-Za-z])')

def _frac(m):
    a, b = (g.strip('{}').strip() for g in m.groups())
    atom = r'-?[0-9A-Za-z.]+'
    return f"{a}/{b}" if re.fullmatch(atom, a) and re.fullmatch(atom, b) else f"({a})/({b})"

def normalize_answer(s):
    """Canonical string for an answer: no LaTeX spacing/markup, units, separators or padding."""
    s = str(s).strip()
    s = re.sub(r'\\[dt]frac', r'\\frac', s)
    # a unit after a number is dropped ("5\text{ cm}" -> "5"); any other \text{x} keeps its x
    s = re.sub(r'^([-\d.,{}\s]+?)\s*\\(?:text|textbf|mbox|mathrm)\{[A-Za-z .]*\}$', r'\1', s)
    for _ in range(3):
        s = re.sub(r'\\(?:text|textbf|mbox|mathrm|mathbf)\{([^{}]*)\}', r'\1', s)
    s = re.sub(r'\^\s*\{?\s*\\circ\s*\}?|°|\\degree', '', s)
    s = re.sub(r'\\(?:left|right)(?![A-Za-z])|\\[!,;: ]|\\?\$', '', s)
    while _FRAC.search(s):
        s = _FRAC.sub(_frac, s)
    s = re.sub(r'\s+', '', s).replace('{,}', ',')
    s = re.sub(r'^[a-z]=(?=.)', '', s)  # "x=5" -> "5"
    if re.fullmatch(r'-?\d{1,3}(,\d{3})+(\.\d*)?', s):  # thousands separators; a tuple "(1,2)" never matches
        s = s.replace(',', '')
    s = s.rstrip('.')
    if re.fullmatch(r'-?\d+(\.\d+)?', s):
        s = re.sub(r'^(-?)0+(?=\d)', r'\1', s)  # "025" -> "25"
        s = re.sub(r'\.0+$', '', s)              # "25.00" -> "25"
    return s

def _to_number(s):
    """A normalised answer as an exact Fraction if it is an int, decimal or a/b; else None."""
    if re.fullmatch(r'-?\d+(\.\d+)?', s):
        return Fraction(s)
    m = re.fullmatch(r'(-?\d+)/(-?\d+)', s) or re.fullmatch(r'\((-?\d+)\)/\((-?\d+)\)', s)
    return Fraction(int(m[1]), int(m[2])) if m and int(m[2]) != 0 else None

def _to_sympy_text(s):
    """LaTeX-ish answer -> a string of safe characters for parse_expr, or None if anything else is left."""
    s = re.sub(r'\\sqrt\s*([0-9a-z])', r'\\sqrt{\1}', s)
    while re.search(r'\\sqrt\{[^{}]*\}', s) or _FRAC.search(s):  # innermost first: \frac{\sqrt{3}}{2}
        s = _FRAC.sub(_frac, re.sub(r'\\sqrt\{([^{}]*)\}', r'sqrt(\1)', s))
    s = s.replace('\\pi', 'pi').replace('\\cdot', '*').replace('\\times', '*')
    s = s.replace('{', '(').replace('}', ')').replace('^', '**')
    if len(s) > 80 or not re.fullmatch(r'[0-9a-z+\-*/().]+', s):
        return None  # quotes, underscores, brackets, backslashes, capitals: nothing reaches the parser
    if any(w not in ('sqrt', 'pi') and len(w) > 1 for w in re.findall(r'[a-z]+', s)):
        return None  # names: sqrt, pi and one-letter variables only
    # guard against 9**9**9-style blow-ups: at most 3 powers, each a short literal, unchained
    exps = [s[m.end():] for m in re.finditer(r'\*\*', s)]
    ok = r'(\d{1,3}(?![\d(])|[a-z](?![a-z(])|\([0-9a-z+\-/]{1,10}\))(?!\*\*)'
    if len(exps) > 3 or not all(re.match(ok, e) for e in exps):
        return None
    return s

def _symbolic_equal(a, b, timeout=2.0):
    """a == b as sympy expressions, in a daemon thread with a time limit; False on timeout or error."""
    ta, tb = _to_sympy_text(a), _to_sympy_text(b)
    if ta is None or tb is None:
        return False
    import sympy  # imported here, in the caller's thread, so the import doesn't eat into the timeout
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations, implicit_multiplication
    # parse_expr eval()s the tokenized text; it only ever sees the whitelisted string above, with no
    # builtins and a namespace of just the names sympy's tokenizer emits plus sqrt and pi
    names = {'__builtins__': {}, 'Integer': sympy.Integer, 'Float': sympy.Float, 'Rational': sympy.Rational,
             'Symbol': sympy.Symbol, 'sqrt': sympy.sqrt, 'pi': sympy.pi}
    result = [False]
    def work():
        try:
            ea, eb = (parse_expr(t, global_dict=dict(names), local_dict={},
                                 transformations=standard_transformations + (implicit_multiplication,))
                      for t in (ta, tb))
            result[0] = bool(sympy.simplify(ea - eb) == 0)
        except Exception:
            pass
    t = threading.Thread(target=work, daemon=True)  # a stuck thread can't be killed; daemon so exit isn't blocked
    t.start()
    t.join(timeout)
    return result[0] if not t.is_alive() else False

def grade(pred, gold):
    """True if the extracted answer `pred` matches `gold`: as numbers if both are, else symbolically, else as text."""
    if pred is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    pn, gn = _to_number(p), _to_number(g)
    if pn is not None and gn is not None:
        return pn == gn  # exact: "25" = "025" = "25.0", "1/2" = "0.5"
    return p == g or _symbolic_equal(p, g)

# -----------------------------------------------------------------------------
# metrics: pure functions over one benchmark's samples

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable product."""
    assert 0 <= c <= n and 1 <= k <= n, f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}"
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))

def avg_at_n(correct):
    return sum(correct) / len(correct) if correct else 0.0

def best_at_n(correct):
    return any(correct)

def _vote_key(a):
    """Answers that grade alike vote alike: '25', '025' and '25.0' share one key."""
    s = normalize_answer(a)
    n = _to_number(s)
    return n if n is not None else s

def majority_index(preds):
    """Index of the majority answer (None doesn't vote; a tie goes to the first seen), or None if no votes."""
    keys = [(_vote_key(p), i) for i, p in enumerate(preds) if p is not None]
    if not keys:
        return None
    counts = Counter(k for k, _ in keys)
    top = max(counts.values())
    return next(i for k, i in keys if counts[k] == top)  # earliest first occurrence among the tied

def maj_at_n(preds, gold):
    """True if the majority-vote answer over the extracted answers grades correct."""
    i = majority_index(preds)
    return i is not None and grade(preds[i], gold)

def dist_4g(texts):
    """Distinct whitespace-token 4-grams / all 4-grams, over one problem's samples (0 if none)."""
    grams = [tuple(w[i:i + 4]) for w in (t.split() for t in texts) for i in range(len(w) - 3)]
    return len(set(grams)) / len(grams) if grams else 0.0

def default_ks(n):
    """pass@k reported for k = 1, 2, 4, ... <= n, and n."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})

def summarize(records, n, ks=None):
    """One benchmark's records (one per sample, n per problem) -> its metrics, fractions in [0, 1]."""
    ks = ks or default_ks(n)
    by_problem = defaultdict(list)
    for r in records:
        by_problem[r['problem_id']].append(r)
    bad = {pid: len(rs) for pid, rs in by_problem.items() if len(rs) != n}
    if bad:
        raise ValueError(f"expected {n} samples per problem; got {dict(list(bad.items())[:5])}")
    probs = [sorted(rs, key=lambda r: r['sample']) for rs in by_problem.values()]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    s = {'n_problems': len(probs), 'n_samples': n}
    s[f'avg@{n}'] = mean([avg_at_n([r['correct'] for r in rs]) for rs in probs])
    s[f'best@{n}'] = mean([float(best_at_n([r['correct'] for r in rs])) for rs in probs])
    for k in ks:
        s[f'pass@{k}'] = mean([pass_at_k(n, sum(r['correct'] for r in rs), k) for rs in probs])
    maj = [majority_index([r['pred'] for r in rs]) for rs in probs]  # the winner's own grade: no gold needed
    s[f'maj@{n}'] = mean([float(i is not None and rs[i]['correct']) for i, rs in zip(maj, probs)])
    s['dist4g'] = mean([dist_4g([r['text'] for r in rs]) for rs in probs])
    s['mean_len'] = mean([r['n_tokens'] for rs in probs for r in rs])
    s['trunc_rate'] = mean([float(r['finish'] == 'length') for rs in probs for r in rs])
    return s

def make_record(bench, problem, sample, text, n_tokens, finish):
    """One sample's record, graded: what samples.jsonl holds and summarize() reads."""
    pred = extract_answer(text)
    return {'id': f"{bench}/{problem['id']}/{sample}", 'bench': bench, 'problem_id': problem['id'],
            'sample': sample, 'text': text, 'n_tokens': n_tokens, 'finish': finish,
            'pred': pred, 'gold': problem['answer'], 'correct': grade(pred, problem['answer'])}

def format_table(summaries):
    """{bench: summary} -> an aligned text table, one row per benchmark; fractions shown as %."""
    cols = list(dict.fromkeys(k for s in summaries.values() for k in s))
    def cell(k, v):
        if v is None:
            return '-'
        if k in ('n_problems', 'n_samples'):
            return str(v)
        return f"{v:.0f}" if k == 'mean_len' else f"{100 * v:.1f}"
    rows = [['benchmark'] + cols] + [[b] + [cell(k, s.get(k)) for k in cols] for b, s in summaries.items()]
    w = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
    return '\n'.join('  '.join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)

def _write_atomic(path, text):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one

def write_outputs(out_dir, summaries, records):
    """summary.json ({bench: metrics}) and samples.jsonl (one record per line) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, 'summary.json'), json.dumps(summaries, indent=2) + '\n')
    _write_atomic(os.path.join(out_dir, 'samples.jsonl'),
                  ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records))

# -----------------------------------------------------------------------------

def checkpoints_in(out):
    """distill.py's checkpoints in out (step_NNNNNNN folders, each complete: saves are renamed into place)."""
    if not os.path.isdir(out):
        return []
    steps = sorted(d for d in os.listdir(out) if d.startswith('step_') and d[5:].isdigit())
    return [os.path.join(out, d) for d in steps]

def resolve_ckpt(path):
    """An HF checkpoint folder as is; distill.py's out_dir -> its newest checkpoint; else as given (hub id)."""
    if os.path.isfile(os.path.join(path, 'config.json')):
        return path
    found = checkpoints_in(path)
    return found[-1] if found else path

def main():
    import sys
    from configurator import ConfigError, apply_config
    keys = [k for k, v in globals().items() if not k.startswith('_') and k.islower()
            and isinstance(v, (int, float, bool, str, list, tuple, type(None)))]
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    try:
        globals().update(apply_config(sys.argv[1:], {k: globals()[k] for k in keys}, verbose=rank == 0))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        evaluate(rank, world)
    except (DataError, ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

def evaluate(rank, world):
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    import rollout
    from model import CheckpointError, resolve_checkpoint
    if world > 1:
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    path = resolve_checkpoint(resolve_ckpt(ckpt))
    if not os.path.isfile(os.path.join(path, 'config.json')):
        raise CheckpointError(f"no config.json in {path!r}: not a checkpoint folder, nor an out_dir of distill.py")
    names = [b.strip() for b in benchmarks.split(',') if b.strip()]
    sets = {name: load_problems(name, data_dir or None)[:limit or None] for name in names}  # errors before work
    if rank == 0:
        print(f"evaluating {path} on {', '.join(names)}: {n_samples} samples per problem, temperature "
              f"{temperature}, top-p {top_p}, up to {max_new_tokens} new tokens ({world} rank(s))")
    tok = rollout.load_tokenizer(path)
    sampler = rollout.make_sampler(backend, path, seed=seed, max_model_len=max_prompt_tokens + max_new_tokens)
    summaries, all_records = {}, []
    for name, problems in sets.items():
        mine = problems[rank::world]  # problems split across ranks, results gathered on rank 0
        records = []
        bar = tqdm(range(0, len(mine), batch_problems), desc=name, disable=rank != 0)
        for i in bar:
            chunk = mine[i:i + batch_problems]
            prompts = [tok.chat(build_prompt(p), enable_thinking=enable_thinking) for p in chunk]
            samples = sampler.generate(prompts, n=n_samples, temperature=temperature, top_p=top_p, top_k=top_k,
                                       max_new_tokens=max_new_tokens, stop_ids=tok.eos_ids,
                                       seed=seed + 7919 * (rank + world * i))
            for p, ss in zip(chunk, samples):
                for j, s in enumerate(ss):
                    records.append(make_record(name, p, j, tok.decode(s.tokens), len(s.tokens), s.finish))
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        summaries[name] = summarize(records, n_samples)
        all_records += records
    if rank == 0:
        print(f"checkpoint: {path}")
        print(format_table(summaries))
        if out:
            write_outputs(out, summaries, all_records)
            print(f"wrote {os.path.join(out, 'summary.json')} and samples.jsonl")
    sampler.close()  # before the process group goes: vLLM's teardown would destroy the shared group
    if world > 1:
        dist.destroy_process_group()
    return summaries

if __name__ == '__main__':
    main()
