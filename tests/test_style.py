"""The project's line rules, checked over every .py file it tracks: no line over 100 characters,
and one statement per line (no `a = 1; b = 2`, no `if x: return y`). A failure lists each offence
as file:line, so it can be fixed where it is."""

import ast
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_COLUMNS = 100


def python_files():
    """The .py files git tracks or would track (untracked but not ignored), relative to the root."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                             "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    paths = listed.stdout.split()
    return sorted(path for path in paths if os.path.exists(os.path.join(ROOT, path)))


def long_lines(path, text):
    return [f"{path}:{number}: {len(line)} characters"
            for number, line in enumerate(text.splitlines(), start=1)
            if len(line) > MAX_COLUMNS]


def shared_lines(path, text):
    """Lines on which two statements start: a statement and its compound header on one line
    (`for x in y: f(x)`) or statements joined by semicolons."""
    first_statement = {}
    offences = []
    for node in ast.walk(ast.parse(text, filename=path)):
        if not isinstance(node, ast.stmt):
            continue
        if node.lineno in first_statement:
            offences.append(f"{path}:{node.lineno}: a second statement on the line")
        else:
            first_statement[node.lineno] = node
    return sorted(set(offences), key=lambda offence: int(offence.split(":")[1]))


def test_the_check_finds_what_it_looks_for():
    text = "x = 1; y = 2\nif x: y = 3\nz = [\n    1]\n" + "w = 0  #" + "-" * 100 + "\n"
    assert shared_lines("f.py", text) == ["f.py:1: a second statement on the line",
                                          "f.py:2: a second statement on the line"]
    assert long_lines("f.py", text) == ["f.py:5: 108 characters"]


def offences_in_every_file(check):
    """check(path, text) over every tracked .py file: the offences it lists, as one report."""
    offences = []
    for path in python_files():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            offences += check(path, f.read())
    return offences, "\n".join(offences)


def test_no_line_over_100_characters():
    offences, report = offences_in_every_file(long_lines)
    assert not offences, f"{len(offences)} lines over {MAX_COLUMNS} characters:\n{report}"


def test_one_statement_per_line():
    offences, report = offences_in_every_file(shared_lines)
    assert not offences, f"{len(offences)} lines hold two statements:\n{report}"
