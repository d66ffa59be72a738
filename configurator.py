"""
nanoGPT's configurator, with clear errors. A script keeps its settings as plain module globals
(lower-case names of ints, floats, bools, strings, lists, tuples or None) and, in main(), calls

    # applies sys.argv, updates the globals, returns the settings
    cfg = configure(globals(), __file__)

so that, e.g., `python distill.py config/tiny.py --method=opd --max_steps 20` runs.

Arguments apply left to right. A bare argument is a python config file, exec'd in a fresh namespace
seeded with the current values; it may only assign known keys (helpers start with '_').
`--key=value` and `--key value` override one key; the value is read with ast.literal_eval, else kept
as the raw string, then checked against the default's type (int is accepted for float; a str default
keeps the raw string; a list/tuple default also takes `1,2,3`; a None default takes anything). A
bool key alone (`--wandb_log`) means True, and takes a following word only if it is true/false/1/0,
so `--wandb_log config/x.py` still reads config/x.py. Every value applied is printed once (rank 0
only under torchrun). Any mistake (a config file that does not parse or raises included) is one line
on stderr and exit status 2. `-h` / `--help` prints the script's docstring and every key with its
default and the comment beside it in the script, and exits 0.
"""
import ast
import difflib
import os
import sys

class ConfigError(ValueError):
    pass

_BOOLS = {'true': True, 'false': False, '1': True, '0': False}

def _literal(s):
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return s  # not a python literal (out/, all, gsm8k): keep the string

def _unknown(key, keys):
    close = difflib.get_close_matches(key, keys, n=1)
    return f"unknown config key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")

def _convert(key, val, default, raw=None):
    """Check val against default's type; raw is the command-line string val came from, if any."""
    if default is None:
        return val
    if isinstance(default, bool):  # before int: bool is a subclass of int
        if raw is not None and raw.strip().lower() in _BOOLS:
            return _BOOLS[raw.strip().lower()]
        if isinstance(val, bool):
            return val
    elif isinstance(default, str):
        if raw is not None:
            return raw  # --layers 3 stays '3', not the int 3
        if isinstance(val, str):
            return val
    elif isinstance(default, (list, tuple)):
        if raw is not None and not isinstance(val, (list, tuple)):  # a,b,c or a single item
            val = [_literal(s.strip()) for s in raw.split(',') if s.strip()]
        if isinstance(val, (list, tuple)):
            return type(default)(val)
    elif isinstance(default, float):
        if isinstance(val, (int, float)) and not isinstance(val, bool):
            return float(val)
    elif isinstance(default, int):
        if isinstance(val, int) and not isinstance(val, bool):
            return val
    shown = raw if raw is not None else val
    raise ConfigError(f"config key '{key}' expects {type(default).__name__}, "
                      f"got {type(val).__name__} {shown!r}")

def print_help(source, defaults):
    """The docstring of the script at path `source`, then each key, its default and
    its comment there."""
    text = open(source).read()
    doc = ast.get_docstring(ast.parse(text)) or ''
    lines = text.splitlines()
    print(doc.strip() + '\n\nsettings (config files and --key=value override them, left to right):')
    for key, val in defaults.items():
        starts = (f'{key} =', f'{key}=')
        at = next((i for i, l in enumerate(lines) if l.lstrip().startswith(starts)), None)
        notes = []
        if at is not None:  # the comment on the key's line, and comment-only lines under it
            notes.append(lines[at].partition('#')[2].strip() if '#' in lines[at] else '')
            j = at + 1
            while j < len(lines) and lines[j].strip().startswith('#') and lines[j].startswith(' '):
                notes.append(lines[j].strip().lstrip('#').strip())
                j += 1
        print(f"  --{key}={val!r}" + ''.join(f"\n      {n}" for n in notes if n))


def apply_config(args, defaults, verbose=True, help_source=None):
    """Apply command-line args (config files and --key overrides) to defaults; returns a new dict.
    help_source: the script's path, for -h / --help (which prints and exits 0)."""
    if help_source and any(a in ('-h', '--help') for a in args):
        print_help(help_source, defaults)
        sys.exit(0)
    cfg = dict(defaults)
    show = verbose and int(os.environ.get('RANK', 0)) == 0
    def put(key, val, src=''):
        if show:
            print(f"config: {key} = {val!r} (was {cfg[key]!r}){src}")
        cfg[key] = val
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith('--'):  # a config file
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: {arg}")
            ns = dict(cfg)
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, 'exec'), ns)
            except Exception as e:
                # a syntax error, or the file raised: one line, as for any other mistake
                where = f" (line {e.lineno})" if isinstance(e, SyntaxError) else ''
                what = e.msg if isinstance(e, SyntaxError) else e
                raise ConfigError(f"{arg}{where}: {type(e).__name__}: {what}") from None
            for k, v in ns.items():
                if k.startswith('_') or callable(v) or type(v) is type(os):
                    continue  # helpers and imports a config file may use, not settings
                if k not in cfg:
                    raise ConfigError(f"{arg}: {_unknown(k, cfg)} "
                                      "(a helper variable in a config file must start with '_')")
                if v is not cfg[k]:
                    put(k, _convert(k, v, cfg[k]), f" from {arg}")
            continue
        key, eq, raw = arg[2:].partition('=')
        if key not in cfg:
            raise ConfigError(_unknown(key, cfg))
        if not eq:  # --key value, or a bare --flag for a bool
            nxt = args[i] if i < len(args) else None
            if isinstance(cfg[key], bool) and (nxt is None or nxt.strip().lower() not in _BOOLS):
                raw = 'True'
            elif nxt is None or nxt.startswith('--'):
                raise ConfigError(f"--{key} needs a value")
            else:
                raw = nxt
                i += 1
        put(key, _convert(key, _literal(raw), cfg[key], raw))
    return cfg


def settings(namespace):
    """A script's settings: the lower-case names of plain values in its globals (modules and
    functions are not)."""
    return {k: v for k, v in namespace.items() if not k.startswith('_') and k.islower()
            and isinstance(v, (int, float, bool, str, list, tuple, type(None)))}


def configure(namespace, script_path, argv=None):
    """Apply argv (sys.argv[1:] by default) to the settings of namespace (a script's globals(), or a
    dict of defaults), update namespace with the result and return it as a dict. A mistake is one
    line on stderr and exit status 2; -h / --help prints script_path's docstring and settings."""
    try:
        args = sys.argv[1:] if argv is None else argv
        cfg = apply_config(args, settings(namespace), help_source=script_path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    namespace.update(cfg)
    return cfg
