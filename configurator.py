"""
nanoGPT's configurator, with clear errors. A script keeps its settings as plain module globals, then:

    config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str, list, tuple, type(None)))]
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    config = {k: globals()[k] for k in config_keys}

and is run as, e.g.

    python eval.py config/eval_gsm8k.py --ckpt out/ --batch_size=16 --compile

Arguments apply left to right. A bare argument is a python config file, exec'd in a fresh namespace
seeded with the current values; it may only assign known keys. `--key=value` and `--key value` override
one key; the value is read with ast.literal_eval, else kept as the raw string, then checked against the
default's type (int is accepted for float; a str default keeps the raw string; a list/tuple default
also takes `1,2,3`; a None default takes anything). A bool key alone (`--compile`) means True, and takes
a following word only if it is true/false/1/0, so `--compile config/x.py` still reads config/x.py.
Every value applied is printed once (rank 0 only under torchrun). Any mistake is one line on stderr
and exit status 2.

Tests and scripts that would rather not exec can import it:  from configurator import apply_config
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
    raise ConfigError(f"config key '{key}' expects {type(default).__name__}, got {type(val).__name__} {raw if raw is not None else val!r}")

def apply_config(args, defaults, verbose=True):
    """Apply command-line args (config files and --key overrides) to defaults; returns a new dict."""
    cfg = dict(defaults)
    show = verbose and int(os.environ.get('RANK', 0)) == 0
    def put(key, val, src=''):
        if show:
            print(f"config: {key} = {val!r} (was {cfg[key]!r}){src}")
        cfg[key] = val
    i = 0
    while i < len(args):
        arg, i = args[i], i + 1
        if not arg.startswith('--'):  # a config file
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: {arg}")
            ns = dict(cfg)
            with open(arg) as f:
                exec(compile(f.read(), arg, 'exec'), ns)
            for k, v in ns.items():
                if k.startswith('_') or callable(v) or type(v) is type(os):
                    continue  # helpers and imports a config file may use, not settings
                if k not in cfg:
                    raise ConfigError(f"{arg}: {_unknown(k, cfg)}")
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
                raw, i = nxt, i + 1
        put(key, _convert(key, _literal(raw), cfg[key], raw))
    return cfg

if 'config_keys' in globals():  # exec'd by a script (importing this module defines no config_keys)
    try:
        globals().update(apply_config(sys.argv[1:], {k: globals()[k] for k in config_keys}))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
