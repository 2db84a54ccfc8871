"""Check-your-understanding exercises, graded by the project's own tests.

    python tools/exercise.py attention.attention_forward            # writes exercises/, prints what to do
    python tools/exercise.py attention.attention_forward --out DIR
    python tools/exercise.py --list                                 # the functions that make good exercises

An exercise is a copy of one concept file (and of the project files it, and its tests, import) in which one
function's body is replaced by `raise NotImplementedError`. Its signature, decorators and docstring stay,
so the docstring's equations say what to write. The grading command it prints,

    python -m pytest tests/test_attention.py --student exercises

runs that file's tests on the copy instead of the reference (tests/conftest.py), the tests that call the
exercise's function first, and names the property each failed test checks. The tool reads source with
`ast` and never imports a project file. It writes into DIR only, and refuses a DIR it could damage: the
repository root, its folders (exercises/ aside) and the folders above it, a folder holding files it did
not write, or a copy the student has changed since it wrote it.

Imports only the standard library.
"""
import argparse
import ast
import difflib
import functools
import hashlib
import io
import json
import os
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
MARKER = ".exercise.json"           # in DIR: what this tool wrote there, to tell a student's edits from its copies
READING_ORDER = ("rnn", "training", "attention", "positional", "multihead", "transformer", "vit", "flash",
                 "linear_attention")
# Good exercises beyond the naming rule (public *_forward / *_backward); a name a file no longer has is left
# out of the list (and tests/test_exercise.py says so, so the table is kept up to date).
EXTRAS = {
    "attention": ("softmax", "causal_mask", "sliding_window_mask"),   # the mask's alignment lives in the last
    "training": ("adam_step",),                                     # the optimizer step
    "transformer": ("_cached_attention",),                          # generation's key/value-cached step
    "flash": ("_flash_forward_tiled", "_flash_backward_tiled"),     # the tile loops
    "linear_attention": ("linear_attention_step",),                 # the recurrent (RNN) view
}


class Refused(Exception):
    """A bad argument or an unsafe DIR: printed as `exercise.py: error: ...`, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# Reading the project


def project_modules():
    """{module name: path} for the top-level *.py files of the repository (the project files)."""
    return {path.stem: path for path in sorted(ROOT.glob("*.py"))}


def parse(path):
    stat = os.stat(path)
    return _parse(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _parse(path, mtime_ns, size):                  # a file is read once per version (the tests ask often)
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def imported_names(path):
    """Every top-level module name an import statement in the file names, nested imports included."""
    stat = os.stat(path)
    return _imported_names(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _imported_names(path, mtime_ns, size):
    names = set()
    for node in ast.walk(_parse(path, mtime_ns, size)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return frozenset(names)


def closure(paths):
    """The project modules that the files in paths import, directly or through each other, and through the
    test helpers (tests/*.py, tests/cuda/*.py) they import. Returns a sorted list of module names."""
    project = project_modules()
    helpers = {p.stem: p for folder in (TESTS, TESTS / "cuda") for p in folder.glob("*.py")
               if not p.stem.startswith("test_")}
    found, seen, todo = set(), set(), list(paths)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            if name in project:
                found.add(name)
                todo.append(project[name])
            elif name in helpers:
                todo.append(helpers[name])
    return sorted(found)


def grading_test(module):
    return TESTS / f"test_{module}.py"


def top_level_functions(tree):
    return {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def exercises():
    """[(module, function, grading test path)]: each public *_forward / *_backward of a project file and each
    EXTRAS entry the file has, for files whose grading test exists; in reading order, then source order."""
    found = []
    project = project_modules()
    order = sorted(project, key=lambda m: (READING_ORDER.index(m) if m in READING_ORDER else len(READING_ORDER), m))
    for module in order:
        test = grading_test(module)
        if not test.exists():
            continue
        functions = top_level_functions(parse(project[module]))
        for name, node in sorted(functions.items(), key=lambda item: item[1].lineno):
            by_rule = (name.endswith(("_forward", "_backward"))
                       and not name.startswith(("_", "init_")))       # init_feed_forward is no forward
            if by_rule or name in EXTRAS.get(module, ()):
                found.append((module, name, test))
    return found


# ----------------------------------------------------------------------------------------------------
# The stub


def header_end(lines, node):
    """(line index, column) just after the colon that ends the `def ...:` header of node."""
    text = "".join(lines[node.lineno - 1:])
    depth = 0
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.OP:
            depth += (token.string in "([{") - (token.string in ")]}")
            if token.string == ":" and depth == 0:
                return node.lineno - 1 + token.end[0] - 1, token.end[1]
    raise ValueError(f"no end to the header of {node.name}")


def stub_source(source, function, tree=None):
    """source with `function`'s body replaced by a raise of NotImplementedError naming it; the lines from its
    decorators through its docstring, and every other line of the file, are kept as they are.
    tree: source's ast, when the caller has it."""
    tree = ast.parse(source) if tree is None else tree
    node = top_level_functions(tree)[function]
    lines = source.splitlines(keepends=True)
    body = node.body
    first = body[0]
    has_docstring = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                     and isinstance(first.value.value, str))
    if has_docstring:                                          # keep through the docstring's closing quotes
        head = lines[:first.end_lineno - 1] + [lines[first.end_lineno - 1][:first.end_col_offset] + "\n"]
        indent = " " * first.col_offset
    else:                                                      # keep through the colon ending the header
        row, col = header_end(lines, node)
        head = lines[:row] + [lines[row][:col] + "\n"]
        indent = " " * (first.col_offset if first.lineno - 1 > row else node.col_offset + 4)
    end = node.end_lineno                                      # lines[end:] follow the function
    while end < len(lines) and lines[end].strip().startswith("#") and \
            len(lines[end]) - len(lines[end].lstrip()) >= len(indent):
        end += 1                                               # the body's trailing comments go with it
    stub = (f'{indent}raise NotImplementedError("{function}: not written yet; '
            f'write its body from the docstring")\n')
    result = "".join(head) + stub + "".join(lines[end:])
    ast.parse(result)                                          # a stub that does not parse is our bug
    return result


# ----------------------------------------------------------------------------------------------------
# Writing DIR safely


def digest(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_out_dir(out, files):
    """Refuse an out dir where writing `files` (names) could destroy something: the repository itself, a
    folder holding files this tool did not write, or a copy the student changed since it was written.
    Returns the marker's record of earlier writes ({name: sha256})."""
    out_real = Path(os.path.realpath(out))
    if out_real == ROOT or out_real in ROOT.parents:
        raise Refused(f"--out {out} is the repository root or a folder above it; an exercise needs a folder "
                      "of its own, such as exercises/")
    project_folders = {p for p in ROOT.iterdir() if p.is_dir() and p.name != "exercises"}
    if any(out_real == folder or folder in out_real.parents for folder in project_folders):
        raise Refused(f"--out {out} lies inside the project folder {out_real.relative_to(ROOT).parts[0]}/; "
                      "choose a new folder, such as exercises/")
    if out_real.exists() and not out_real.is_dir():
        raise Refused(f"--out {out} is a file, not a folder")
    if not out_real.exists():
        return {}
    marker = out_real / MARKER
    entries = [p.name for p in out_real.iterdir() if p.name not in (MARKER, "__pycache__", ".hypothesis")]
    if not marker.exists():
        if entries:
            raise Refused(f"--out {out} already holds files that tools/exercise.py did not write "
                          f"({', '.join(sorted(entries)[:5])}); choose a new or empty folder")
        return {}
    written = json.loads(marker.read_text(encoding="utf-8")).get("written", {})
    changed = []
    for name in files:
        target = out_real / name
        if target.is_symlink():
            raise Refused(f"--out {out}: {name} is a symbolic link; refusing to write through it")
        if target.exists() and digest(target.read_text(encoding="utf-8")) != written.get(name):
            changed.append(name)
    if changed:
        raise Refused(f"--out {out}: {', '.join(changed)} changed since tools/exercise.py wrote them "
                      "(your work?); choose another --out, or move them away first")
    return written


def make_exercise(module, function, out):
    """Write the exercise into out; return (the files written, the grading test)."""
    project = project_modules()
    test = grading_test(module)
    files = sorted(set([module] + closure([project[module]]) + closure([test, TESTS / "conftest.py"])))
    names = [f"{name}.py" for name in files]
    written = check_out_dir(out, names)
    out.mkdir(parents=True, exist_ok=True)
    for name in files:
        text = project[name].read_text(encoding="utf-8")
        if name == module:
            text = stub_source(text, function, parse(project[name]))
        with open(out / f"{name}.py", "w", encoding="utf-8", newline="") as f:
            f.write(text)
        written[f"{name}.py"] = digest(text)
    record = {"exercise": f"{module}.{function}", "grading_test": str(test.relative_to(ROOT)), "written": written}
    (out / MARKER).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return files, test


# ----------------------------------------------------------------------------------------------------
# Command line


def resolve(target):
    """'module.function' -> (module, function), or Refused naming what is wrong."""
    module, dot, function = target.partition(".")
    project = project_modules()
    if not dot or not module or not function or "." in function:
        raise Refused(f"need MODULE.FUNCTION, such as attention.attention_forward, got {target!r}")
    if module not in project:
        close = difflib.get_close_matches(module, project, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise Refused(f"no project file {module}.py{hint}; the project files are: {', '.join(project)}")
    tree = parse(project[module])
    functions = top_level_functions(tree)
    if function not in functions:
        defined = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                   for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                   if isinstance(t, ast.Name)}
        defined |= {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
        if function in defined:
            raise Refused(f"{module}.{function} is not a function (an exercise rewrites a function's body)")
        close = difflib.get_close_matches(function, functions, n=1)
        hint = f" (did you mean {module}.{close[0]}?)" if close else ""
        raise Refused(f"{module}.py has no top-level function {function}{hint}; "
                      "`python tools/exercise.py --list` lists good exercises")
    if not grading_test(module).exists():
        raise Refused(f"{module}.py has no grading test tests/test_{module}.py")
    return module, function


def shown(path):
    """path relative to the current folder when it lies below it, else absolute: a command to copy."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/exercise.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="\n\n".join(__doc__.split("\n\n")[:5]))
    parser.add_argument("target", nargs="?", metavar="MODULE.FUNCTION", help="e.g. attention.attention_forward")
    parser.add_argument("--out", default=str(ROOT / "exercises"), metavar="DIR",
                        help="where to write the exercise (default: exercises/ in the repository)")
    parser.add_argument("--list", action="store_true", help="list the functions that make good exercises")
    args = parser.parse_args(argv)
    if args.list == (args.target is not None):
        parser.error("give MODULE.FUNCTION or --list (one of them)")
    if args.list:
        listed = [(f"{module}.{function}", test) for module, function, test in exercises()]
        width = max(len(name) for name, _ in listed)
        for name, test in listed:
            print(f"{name:<{width}}  graded by {test.relative_to(ROOT)}")
        return 0
    try:
        module, function = resolve(args.target)
        out = Path(args.out)
        files, test = make_exercise(module, function, out)
    except Refused as error:
        parser.error(str(error))                               # prints usage and the reason, exits 2
    others = [f"{name}.py" for name in files if name != module]
    print(f"Exercise {module}.{function}: its body in {shown(out / (module + '.py'))} now raises "
          "NotImplementedError.")
    print(f"  Read its docstring (and the module docstring's equations), then write the body.")
    print(f"  Unchanged copies beside it, which it or its tests import: {', '.join(others) or 'none'}.")
    print(f"  Tests named '...bad input...' also expect the input checks of the reference (see the file's")
    print(f"  'Input checks' section for the checkers it calls).")
    print(f"Grade it (every test of {test.name}, run on your copy):")
    print(f"  python -m pytest {shown(test)} --student {shown(out)}")
    print(f"The tests that call {function} run first; add -x to stop at the first broken property.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
