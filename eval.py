"""
Standalone evaluator on AIME 2024, AIME 2025 and AIMO (the OPRD paper's protocol, METHOD.md §6):
16 samples per problem at temperature 0.7 / top-p 0.95, the last \\boxed{...} graded against the
gold answer, reported as Avg@16, Best@16, pass@k, maj@16, Dist-4g, mean response length and
truncation rate.

$ python eval.py --ckpt=out/qwen_oprd        # the three sets, from benchmarks/ (shipped)
$ python eval.py --ckpt=out --data_dir=DIR   # <DIR>/<name>.jsonl instead of benchmarks/
$ python eval.py --ckpt=out --benchmarks=aime24 --limit=5 --n_samples=2   # a quick look

The top half of this file (data, grading, metrics, output) imports without torch, so tests and
lab/bench.py use it directly; main() at the bottom does the generation.
"""
import json
import math
import os
import re
import threading
from collections import Counter, defaultdict
from fractions import Fraction

from data import DataError, encode_prompt, load_problems

# -----------------------------------------------------------------------------
# default config values, overridden by a config file or --key=value on the command line
ckpt = 'out'                  # checkpoint folder (or a hub model id) to evaluate
benchmarks = 'aime24,aime25,aimo'
# folder of <name>.jsonl; '' = $OPRD_DATA_DIR, then benchmarks/, then the hub
data_dir = ''
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
# auto (cuda if there is one) | cpu | cuda: the torch sampler's device and NCCL/gloo
device = 'auto'
# vLLM's share of the GPU: eval.py runs alone (distill.py's engine gets 0.3)
gpu_memory_utilization = 0.9
# minutes a rank waits in a collective. Under torchrun the ranks meet in a gather after each
# benchmark, where those done first wait for the slowest: shards differ in length (n_samples per
# problem, each up to max_new_tokens), so NCCL's 10-minute default would stop a run whose ranks
# finish further apart. Two hours (distill.py's default too) leaves room for a slow shard; its one
# cost is that a rank that dies leaves the others waiting that long. Raise it for longer responses.
dist_timeout_min = 120
# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# grading: pure string work, plus sympy on a whitelisted string; model text is never eval'd or
# exec'd

def extract_answer(text):
    """Content of the last \\boxed{...} / \\fbox{...} (balanced braces) or \\boxed <token>; else
    None."""
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
    # thousands separators; a tuple "(1,2)" never matches
    if re.fullmatch(r'-?\d{1,3}(,\d{3})+(\.\d*)?', s):
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
    """LaTeX-ish answer -> a string of safe characters for parse_expr, or None if anything else is
    left."""
    s = re.sub(r'\\sqrt\s*([0-9a-z])', r'\\sqrt{\1}', s)
    # innermost first: \frac{\sqrt{3}}{2}
    while re.search(r'\\sqrt\{[^{}]*\}', s) or _FRAC.search(s):
        s = _FRAC.sub(_frac, re.sub(r'\\sqrt\{([^{}]*)\}', r'sqrt(\1)', s))
    s = s.replace('\\pi', 'pi').replace('\\cdot', '*').replace('\\times', '*')
    s = s.replace('{', '(').replace('}', ')').replace('^', '**')
    if len(s) > 80 or not re.fullmatch(r'[0-9a-z+\-*/().]+', s):
        # quotes, underscores, brackets, backslashes, capitals: nothing reaches the parser
        return None
    if any(w not in ('sqrt', 'pi') and len(w) > 1 for w in re.findall(r'[a-z]+', s)):
        return None  # names: sqrt, pi and one-letter variables only
    # guard against 9**9**9-style blow-ups: at most 3 powers, each a short literal, unchained
    exps = [s[m.end():] for m in re.finditer(r'\*\*', s)]
    ok = r'(\d{1,3}(?![\d(])|[a-z](?![a-z(])|\([0-9a-z+\-/]{1,10}\))(?!\*\*)'
    if len(exps) > 3 or not all(re.match(ok, e) for e in exps):
        return None
    return s

def _symbolic_equal(a, b, timeout=2.0):
    """a == b as sympy expressions, in a daemon thread with a time limit; False on timeout or
    error."""
    ta, tb = _to_sympy_text(a), _to_sympy_text(b)
    if ta is None or tb is None:
        return False
    # imported here, in the caller's thread, so the import doesn't eat into the timeout
    import sympy
    from sympy.parsing.sympy_parser import (parse_expr, standard_transformations,
                                            implicit_multiplication)
    # parse_expr eval()s the tokenized text; it only ever sees the whitelisted string above, with no
    # builtins and a namespace of just the names sympy's tokenizer emits plus sqrt and pi
    names = {'__builtins__': {}, 'Integer': sympy.Integer, 'Float': sympy.Float,
             'Rational': sympy.Rational, 'Symbol': sympy.Symbol, 'sqrt': sympy.sqrt,
             'pi': sympy.pi}
    transformations = standard_transformations + (implicit_multiplication,)
    result = [False]
    def work():
        try:
            ea, eb = (parse_expr(t, global_dict=dict(names), local_dict={},
                                 transformations=transformations)
                      for t in (ta, tb))
            result[0] = bool(sympy.simplify(ea - eb) == 0)
        except Exception:
            pass
    # a stuck thread can't be killed; daemon so exit isn't blocked
    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if not t.is_alive() else False

def grade(pred, gold):
    """True if the extracted answer `pred` matches `gold`: as numbers if both are, else
    symbolically, else as text."""
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
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a stable
    product."""
    assert 0 <= c <= n and 1 <= k <= n, (
        f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
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
    """Index of the majority answer (None doesn't vote; a tie goes to the first seen), or None if no
    votes."""
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
    """One benchmark's records (one per sample, n per problem) -> its metrics, fractions in
    [0, 1]."""
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
    # the winner's own grade: no gold needed
    maj = [majority_index([r['pred'] for r in rs]) for rs in probs]
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
    rows = [['benchmark'] + cols]
    rows += [[b] + [cell(k, s.get(k)) for k in cols] for b, s in summaries.items()]
    w = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
    lines = ('  '.join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
             for r in rows)
    return '\n'.join(lines)

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

def resolve_ckpt(path):
    """An HF checkpoint folder as is; distill.py's out_dir -> its newest checkpoint; else as given
    (hub id)."""
    from model import checkpoints_in  # lazy: the top half of this file imports without torch
    if os.path.isfile(os.path.join(path, 'config.json')):
        return path
    found = checkpoints_in(path)
    return found[-1] if found else path

def check_settings():
    """Every setting's range and every input, before a model loads or a folder is made: one
    ValueError."""
    rules = [('n_samples', n_samples >= 1, '>= 1'),
             ('max_new_tokens', max_new_tokens >= 1, '>= 1'),
             ('batch_problems', batch_problems >= 1, '>= 1'),
             ('max_prompt_tokens', max_prompt_tokens >= 1, '>= 1'),
             ('limit', limit >= 0, '>= 0 (0 = all)'),
             ('temperature', temperature >= 0, '>= 0'),
             ('top_p', 0 < top_p <= 1, 'in (0, 1]'),
             ('top_k', top_k == -1 or top_k >= 1, '-1 (off) or >= 1'),
             ('backend', backend in ('auto', 'vllm', 'torch'), 'auto, vllm or torch'),
             ('device', device in ('auto', 'cpu', 'cuda'), 'auto, cpu or cuda'),
             ('gpu_memory_utilization', 0 < gpu_memory_utilization <= 1, 'in (0, 1]'),
             ('dist_timeout_min', dist_timeout_min > 0, '> 0 (minutes)'),
             ('benchmarks', any(b.strip() for b in benchmarks.split(',')),
              'at least one benchmark name')]
    for key, ok, want in rules:
        if not ok:
            raise ValueError(f"{key}={globals()[key]!r}: must be {want}")
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out={out!r} is a file: --out names a folder "
                         "(for summary.json and samples.jsonl)")
    if device == 'cuda':
        import torch
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no GPU: use device=cpu (or auto)")

def main():
    import sys
    from configurator import configure
    configure(globals(), __file__)
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    try:
        check_settings()
        evaluate(rank, world)
    except (DataError, ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

def evaluate(rank, world):
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    import rollout
    from fsdp import setup_distributed
    from model import CheckpointError, resolve_checkpoint
    from tokenizer import load_tokenizer
    on_gpu = device == 'cuda' or (device == 'auto' and torch.cuda.is_available())
    if world > 1:
        # distill.py's set-up: each rank binds its own GPU (cuda:LOCAL_RANK) before the NCCL group
        # starts, or the gather below would run every rank on cuda:0; gloo on the CPU
        setup_distributed(device, dist_timeout_min)
    path = resolve_checkpoint(resolve_ckpt(ckpt))
    if not os.path.isfile(os.path.join(path, 'config.json')):
        if os.path.isdir(path):
            what = "an out_dir of distill.py with no step_* checkpoint in it"
        else:
            what = "not a folder"
        raise CheckpointError(f"no config.json in {path!r}: {what}")
    names = [b.strip() for b in benchmarks.split(',') if b.strip()]
    # errors before work
    sets = {name: load_problems(name, data_dir or None)[:limit or None] for name in names}
    if rank == 0:
        print(f"evaluating {path} on {', '.join(names)}: {n_samples} samples per problem, "
              f"temperature {temperature}, top-p {top_p}, up to {max_new_tokens} new tokens "
              f"({world} rank(s))")
    tok = load_tokenizer(path)
    if on_gpu:
        dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    else:
        dev = torch.device('cpu')
    sampler = rollout.make_sampler(
        backend, path, seed=seed, max_model_len=max_prompt_tokens + max_new_tokens, device=dev,
        gpu_memory_utilization=gpu_memory_utilization if on_gpu else None, n_tokens=tok.vocab_size,
        enforce_eager=not on_gpu)  # vLLM's CPU build would compile at every start
    summaries, all_records = {}, []
    for name, problems in sets.items():
        mine = problems[rank::world]  # problems split across ranks, results gathered on rank 0
        records = []
        bar = tqdm(range(0, len(mine), batch_problems), desc=name, disable=rank != 0)
        for i in bar:
            chunk = mine[i:i + batch_problems]
            prompts = [encode_prompt(p, tok, enable_thinking) for p in chunk]
            # each problem's samples are seeded by its index in the set: the same whatever the
            # ranks and batches
            places = [rank + world * (i + k) for k in range(len(chunk))]
            samples = sampler.generate(prompts, n=n_samples, temperature=temperature, top_p=top_p,
                                       top_k=top_k, max_new_tokens=max_new_tokens,
                                       stop_ids=tok.eos_ids, seed=seed, places=places)
            for p, ss in zip(chunk, samples):
                for j, s in enumerate(ss):
                    text = tok.decode(s.tokens)
                    records.append(make_record(name, p, j, text, len(s.tokens), s.finish))
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
    # before the process group goes; vLLM's teardown may destroy the shared group itself
    sampler.close()
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return summaries

if __name__ == '__main__':
    main()
