"""Tests for tools/exercise.py and for `pytest --student DIR` (tests/conftest.py).

An exercise is only worth taking if its grading tests tell a wrong body from a right one, so: every listed
exercise's stub fails its grading tests; the reference body passes them (the full files, for a handful of
representative exercises); three planted, subtle bugs each fail a test that names the property they break;
and the copy is graded alone (the project files the run imports all lie in DIR). The tool itself writes
into DIR only and refuses, with exit code 2 and a message, bad names and folders it could damage.

Grading runs are real `python -m pytest tests/test_X.py --student DIR -x -q` runs, each in a process of its
own, forked from a server that has already imported numpy, pytest and hypothesis: a fresh interpreter per
run would cost more than the runs themselves (~57 of them). They use one BLAS thread, no cache provider,
and the "fail-fast" hypothesis profile (a failing example is not shrunk).
"""
import ast
import json
import os
import queue
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))   # tools/ is a folder of scripts, not a package
import exercise as tool  # noqa: E402

EXERCISES = tool.exercises()
IDS = [f"{module}.{function}" for module, function, _ in EXERCISES]
# The options of a grading run, and two that only change how a failure is printed. Plugins are not
# autoloaded (Grader): hypothesis's would rewrite its 70 modules' asserts on every start and, on a
# failure, import libcst and write a patch file into the repository's .hypothesis/.
OPTIONS = ["-q", "-p", "no:cacheprovider", "--tb=native", "--assert=plain"]
GRADE_OPTIONS = ["-x", *OPTIONS]

# ----------------------------------------------------------------------------------------------------
# Grading runs, forked from a server that imported the heavy modules once

SERVER = r"""
import gc, json, os, signal, sys
import numpy, numpy.testing, pytest, hypothesis, hypothesis.strategies, _pytest.assertion.rewrite
gc.freeze()     # what is imported here is never garbage: the runs' gc.collect() calls skip it
print("ready", flush=True)
for line in sys.stdin:
    args, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        signal.alarm(240)                       # a run that hangs is killed (exit status -14), not waited for
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            code = int(pytest.main(args))
        except BaseException as error:
            print("grading run crashed:", repr(error))
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    print(os.waitstatus_to_exitcode(status), round(usage.ru_utime + usage.ru_stime, 2), flush=True)
"""


class Grader:
    """Runs `pytest TEST --student DIR *options` in a child forked from a warm server; returns (rc, output).
    Two servers, so that two runs go at once on two cores."""

    def __init__(self, workers=2):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", HYPOTHESIS_PROFILE="fail-fast")
        env.pop("PYTEST_ADDOPTS", None)
        self.servers = [subprocess.Popen([sys.executable, "-c", SERVER], cwd=ROOT, env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(workers)]
        self.idle = queue.Queue()
        for server in self.servers:
            assert server.stdout.readline().strip() == "ready", "the grading server did not start"
            self.idle.put(server)

    def grade(self, test, folder, *options):
        log = os.path.join(folder, "grading.log")
        server = self.idle.get()
        try:
            server.stdin.write(json.dumps([[str(test), "--student", str(folder), *options], log]) + "\n")
            server.stdin.flush()
            rc, seconds = server.stdout.readline().split()
        finally:
            self.idle.put(server)
        with open(log, encoding="utf-8") as f:
            return int(rc), f.read() + f"\n(grading run: {seconds} s of CPU)\n"

    def grade_all(self, jobs):
        """jobs: [(test, folder, options)] -> [(rc, output)], two at a time."""
        with ThreadPoolExecutor(len(self.servers)) as pool:
            return list(pool.map(lambda job: self.grade(job[0], job[1], *job[2]), jobs))

    def close(self):
        for server in self.servers:
            server.stdin.close()
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def grader():
    if not hasattr(os, "fork"):
        pytest.skip("the grading runs fork from a warm server, which needs os.fork (Linux, macOS)")
    g = Grader()
    yield g
    g.close()


def make(module, function, folder, source=None):
    """Write the exercise module.function into folder; with source, the student's module text instead of
    the stub. Returns the grading test's path."""
    files, test = tool.make_exercise(module, function, folder)
    if source is not None:
        (folder / f"{module}.py").write_text(source, encoding="utf-8")
    return test


def broken(output):
    """The (property, 'test name: why') pairs of the BROKEN lines of a --student run's summary."""
    lines = output.splitlines()
    return [(line[len("BROKEN  "):], lines[i + 1].strip()) for i, line in enumerate(lines)
            if line.startswith("BROKEN  ")]


# ----------------------------------------------------------------------------------------------------
# Every listed stub fails its grading tests; the reference passes them


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{exercise id: its folder}, every listed exercise made once."""
    root = tmp_path_factory.mktemp("stubs")
    for module, function, _ in EXERCISES:
        make(module, function, root / f"{module}.{function}")
    return {name: root / name for name in IDS}


@pytest.fixture(scope="module")
def stub_runs(grader, made):
    """{exercise id: (rc, output)} of every listed exercise's stub, graded with -x."""
    jobs = [(test, made[f"{module}.{function}"], GRADE_OPTIONS) for module, function, test in EXERCISES]
    return dict(zip(IDS, grader.grade_all(jobs)))


@pytest.mark.parametrize("module,function,test", EXERCISES, ids=IDS)
def test_every_listed_stub_fails_a_grading_test_by_raising_not_implemented_error(stub_runs, module, function,
                                                                                    test):
    rc, output = stub_runs[f"{module}.{function}"]
    assert rc == 1, f"the grading run ended with exit code {rc} (1 = tests failed):\n{output[-3000:]}"
    failures = broken(output)
    assert failures, f"no BROKEN line in the --student summary:\n{output[-3000:]}"
    assert f"NotImplementedError: {function}:" in failures[0][1], failures


# A few files whose full runs are short on two cores: the reference body passes every test, on the copy.
REPRESENTATIVE = [("training", "adam_step"), ("positional", "rope_forward")]


@pytest.mark.parametrize("module,function", REPRESENTATIVE, ids=[f"{m}.{f}" for m, f in REPRESENTATIVE])
def test_the_reference_body_passes_every_grading_test_and_is_graded_from_dir(grader, tmp_path, module, function):
    folder = tmp_path / "ex"
    test = make(module, function, folder, source=(ROOT / f"{module}.py").read_text(encoding="utf-8"))
    rc, output = grader.grade(test, folder, *OPTIONS)
    assert rc == 0 and "every property holds" in output, output[-3000:]
    imported = re.search(r"^project files imported: (.*)$", output, re.M).group(1).split(", ")
    assert str(folder / f"{module}.py") in imported
    outside = [path for path in imported if os.path.dirname(path) != str(folder)]
    assert not outside, f"reference files imported by a --student run: {outside}"


# ----------------------------------------------------------------------------------------------------
# Planted bugs fail a test named for the property they break


def function_text(source, name):
    node = tool.top_level_functions(ast.parse(source))[name]
    return ast.get_source_segment(source, node)


def planted(module, name, old, new):
    """The reference module's text with `old` replaced by `new` once, inside function `name`."""
    source = (ROOT / f"{module}.py").read_text(encoding="utf-8")
    body = function_text(source, name)
    assert body.count(old) == 1, f"cannot plant the bug: {module}.{name} no longer holds {old!r} once"
    return source.replace(body, body.replace(old, new))


def unscaled_scores():
    """attention.py whose attention_forward forgets the scale: `(q k^T) * scale` becomes `(q k^T)`."""
    source = (ROOT / "attention.py").read_text(encoding="utf-8")
    node = tool.top_level_functions(ast.parse(source))["attention_forward"]
    [product] = [n for n in ast.walk(node) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult)
                 and isinstance(n.right, ast.Name) and n.right.id == "scale"]
    return planted("attention", "attention_forward", ast.get_source_segment(source, product),
                   ast.get_source_segment(source, product.left))


def forgetting_the_residual():
    """transformer.py whose encoder_layer_backward returns only the gradient through each sublayer's f,
    forgetting the residual path's: a copy of _sublayer_backward whose `dx = dout + dx_f` is `dx = dx_f`."""
    source = (ROOT / "transformer.py").read_text(encoding="utf-8")
    helper = function_text(source, "_sublayer_backward")
    buggy, n = re.subn(r"\bdx = \w+ \+ dx_f\b", "dx = dx_f", helper)
    assert n >= 1, "cannot plant the bug: _sublayer_backward no longer sums `dx = <residual> + dx_f`"
    buggy = buggy.replace("def _sublayer_backward(", "def _sublayer_backward_without_residual(")
    encoder = function_text(source, "encoder_layer_backward")
    assert "_sublayer_backward(" in encoder, "cannot plant the bug: encoder_layer_backward changed"
    source = source.replace(encoder, encoder.replace("_sublayer_backward(", "_sublayer_backward_without_residual("))
    return source + "\n\n" + buggy + "\n"


PLANTED = {
    "attention_forward without the 1/sqrt(Dk) scale": (
        "attention", "attention_forward",
        unscaled_scores,
        {"test_output_equals_the_formula_computed_independently",
         "test_default_scale_is_one_over_sqrt_of_the_query_key_width_not_the_value_width",
         "test_an_explicit_scale_multiplies_the_scores"}),
    "causal mask aligned at the top-left": (          # causal_mask is sliding_window_mask(left=None, right=0)
        "attention", "sliding_window_mask",
        lambda: planted("attention", "sliding_window_mask", "p = xp.arange(T)[:, None] + (S - T)",
                        "p = xp.arange(T)[:, None]"),
        {"test_causal_mask_examples_are_bottom_right_aligned",
         "test_causal_mask_lets_query_i_see_key_j_iff_j_le_i_plus_s_minus_t",
         "test_causal_window_w_sees_exactly_min_w_plus_1_p_plus_1_keys_flash_attention_2s_count",
         "test_sliding_window_mask_is_the_band_p_minus_left_to_p_plus_right"}),
    "encoder_layer_backward forgetting the residual gradient": (
        "transformer", "encoder_layer_backward", forgetting_the_residual,
        {"test_encoder_layer_gradients_match_finite_differences"}),
}


@pytest.mark.parametrize("bug", PLANTED)
def test_a_planted_bug_fails_a_test_named_for_the_property_it_breaks(grader, tmp_path, bug):
    module, function, student_source, expected = PLANTED[bug]
    folder = tmp_path / "ex"
    test = make(module, function, folder, source=student_source())
    rc, output = grader.grade(test, folder, *GRADE_OPTIONS)
    assert rc == 1, output[-3000:]
    [(prop, why)] = broken(output)
    name = why.split("[")[0].split(":")[0]
    assert name in expected, f"{bug}: the first failure was {why!r}, expected one of {sorted(expected)}"
    # The summary states the property: the test's docstring, or its name read as a sentence.
    node = tool.top_level_functions(ast.parse(test.read_text(encoding="utf-8")))[name]
    doc = ast.get_docstring(node)
    assert prop == (" ".join(doc.split("\n\n")[0].split()) if doc else name[5:].replace("_", " "))


# ----------------------------------------------------------------------------------------------------
# The list


def test_list_holds_every_public_forward_and_backward_plus_the_named_extras():
    listed = set(IDS)
    for path in ROOT.glob("*.py"):
        if not (ROOT / "tests" / f"test_{path.stem}.py").exists():
            continue
        for name in re.findall(r"^def ([a-z]\w*_(?:forward|backward))\(", path.read_text(encoding="utf-8"), re.M):
            assert name.startswith("init_") or f"{path.stem}.{name}" in listed, f"{path.stem}.{name} not listed"
    assert {"training.adam_step", "transformer._cached_attention", "flash._flash_forward_tiled",
            "flash._flash_backward_tiled", "attention.causal_mask", "transformer.encoder_layer_backward",
            "attention.attention_forward"} <= listed
    assert not any(f.startswith("init_") for _, f, _ in EXERCISES)


def test_every_extra_named_in_the_table_still_exists_in_its_file():
    for module, names in tool.EXTRAS.items():
        path = ROOT / f"{module}.py"
        if path.exists():             # linear_attention.py joins when it lands
            missing = set(names) - set(tool.top_level_functions(ast.parse(path.read_text(encoding="utf-8"))))
            assert not missing, f"tools/exercise.py EXTRAS names {missing} that {module}.py no longer has"


def test_a_new_concept_file_joins_the_list_once_its_grading_test_exists(tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "linear_attention.py").write_text(
        "def linear_attention_forward(q, k, v):\n    return q, {}\n\n\n"
        "def linear_attention_backward(dout, cache):\n    return dout\n\n\n"
        "def linear_attention_step(q, k, v, state=None):\n    return q, state\n\n\n"
        "def _helper_forward(x):\n    return x\n")
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    monkeypatch.setattr(tool, "TESTS", tmp_path / "tests")
    assert tool.exercises() == []                       # no grading test yet
    (tmp_path / "tests" / "test_linear_attention.py").write_text("import linear_attention\n")
    assert [f for _, f, _ in tool.exercises()] == ["linear_attention_forward", "linear_attention_backward",
                                                   "linear_attention_step"]


def test_list_on_the_command_line_prints_each_exercise_and_its_grading_test():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "exercise.py"), "--list"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == IDS
    assert all(line.endswith(f"tests/test_{line.split('.')[0]}.py") for line in lines)


# ----------------------------------------------------------------------------------------------------
# The stub: only the body changes


@pytest.mark.parametrize("module,function,test", EXERCISES, ids=IDS)
def test_stub_keeps_signature_decorators_docstring_and_every_other_line(made, module, function, test):
    reference = (ROOT / f"{module}.py").read_text(encoding="utf-8")
    folder = made[f"{module}.{function}"]
    stubbed = (folder / f"{module}.py").read_text(encoding="utf-8")
    compile(stubbed, f"{module}.py", "exec")
    ref_node = tool.top_level_functions(ast.parse(reference))[function]
    node = tool.top_level_functions(ast.parse(stubbed))[function]
    assert ast.dump(node.args) == ast.dump(ref_node.args)
    assert [ast.dump(d) for d in node.decorator_list] == [ast.dump(d) for d in ref_node.decorator_list]
    assert ast.get_docstring(node, clean=False) == ast.get_docstring(ref_node, clean=False)
    *doc, stub = node.body
    assert len(doc) == (ast.get_docstring(ref_node) is not None)
    assert isinstance(stub, ast.Raise) and stub.exc.func.id == "NotImplementedError"
    assert stub.exc.args[0].value.startswith(f"{function}: ")
    # Every line before the function and after it is the reference's, byte for byte (the body's own
    # trailing comment lines, if any, leave with it).
    ref_lines, stub_lines = reference.splitlines(keepends=True), stubbed.splitlines(keepends=True)
    assert stub_lines[:node.lineno - 1] == ref_lines[:ref_node.lineno - 1]
    after, ref_after = stub_lines[node.end_lineno:], ref_lines[ref_node.end_lineno:]
    gone = ref_after[:len(ref_after) - len(after)]
    assert ref_after[len(gone):] == after and all(line.strip().startswith("#") for line in gone)
    # The other files are the reference's, unchanged.
    for path in folder.glob("*.py"):
        if path.stem != module:
            assert path.read_text(encoding="utf-8") == (ROOT / path.name).read_text(encoding="utf-8")


def test_stub_of_a_function_without_docstring_or_on_one_line_is_a_valid_raise():
    source = ("import os\n\n\n@staticmethod\ndef one(x): return x  # trailing\n\n\n"
              "def two(a,\n        b=1):\n    # why\n    c = a + b\n    return c\n    # leftover\n\n\nX = 1\n")
    once = tool.stub_source(source, "one")
    assert 'def one(x):\n    raise NotImplementedError("one: ' in once and "return x" not in once
    twice = tool.stub_source(once, "two")
    assert "return c" not in twice and "leftover" not in twice and "# why" not in twice
    assert twice.endswith("\n\n\nX = 1\n") and twice.startswith("import os\n\n\n@staticmethod\n")
    assert 'def two(a,\n        b=1):\n    raise NotImplementedError("two: ' in twice


# ----------------------------------------------------------------------------------------------------
# Writing only into DIR, refusing what could do damage


def listing(*folders):
    """{path: (size, mtime)} of every file under the folders, hidden folders (.git, .hypothesis) aside:
    git and other pytest sessions may write there meanwhile, and the tool never does."""
    stats = {}
    for folder in folders:
        for d, subfolders, files in os.walk(folder):
            subfolders[:] = [name for name in subfolders if not name.startswith(".")]
            stats.update((os.path.join(d, f), os.lstat(os.path.join(d, f))) for f in files)
    return {path: (stat.st_size, stat.st_mtime_ns) for path, stat in stats.items()}


def run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "exercise.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_the_tool_writes_only_into_dir_and_prints_the_grading_command(tmp_path):
    out = tmp_path / "course" / "ex"
    before = listing(ROOT, tmp_path)
    result = run_tool("attention.attention_forward", "--out", out)
    assert result.returncode == 0, result.stderr
    after = listing(ROOT, tmp_path)
    new = {path for path in after if path not in before or after[path] != before[path]}
    assert new and all(path.startswith(str(out) + os.sep) for path in new), sorted(new)
    assert not set(before) - set(after)                           # nothing deleted
    names = {p.name for p in out.iterdir()}
    assert {".exercise.json", "attention.py"} <= names and all((ROOT / n).exists() for n in names - {".exercise.json"})
    assert f"python -m pytest tests/test_attention.py --student {out}" in result.stdout
    assert str(out / "attention.py") in result.stdout


@pytest.mark.parametrize("args,message", [
    (["nosuch.forward"], "no project file nosuch.py"),
    (["attention.nosuch"], "attention.py has no top-level function nosuch"),
    (["attention.attention_forwad"], "did you mean attention.attention_forward?"),
    (["multihead.PARAM_NAMES"], "multihead.PARAM_NAMES is not a function"),
    (["attention"], "need MODULE.FUNCTION"),
    (["attention.softmax.x"], "need MODULE.FUNCTION"),
    ([], "give MODULE.FUNCTION or --list"),
    (["attention.softmax", "--list"], "give MODULE.FUNCTION or --list"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v) or "nothing")
def test_bad_arguments_are_refused_with_a_message_and_exit_code_2(tmp_path, args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        tool.main([*args, "--out", str(tmp_path / "ex")])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ex").exists()


def test_a_module_without_a_grading_test_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tool, "TESTS", tmp_path / "no tests here")
    with pytest.raises(SystemExit) as stop:
        tool.main(["attention.softmax", "--out", str(tmp_path / "ex")])
    assert stop.value.code == 2 and "has no grading test tests/test_attention.py" in capsys.readouterr().err


def test_a_folder_that_could_lose_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    def refused(out, message):
        before = listing(out) if tmp_path in out.parents else None   # the repository is checked above
        with pytest.raises(SystemExit) as stop:
            tool.main(["attention.causal_mask", "--out", str(out)])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
        assert before is None or listing(out) == before

    refused(ROOT, "is the repository root")
    refused(ROOT.parent, "is the repository root or a folder above it")
    refused(ROOT / "tests", "inside the project folder tests/")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "attention.py").write_text("# my own attention\n")
    refused(foreign, "already holds files that tools/exercise.py did not write")
    # An exercise folder: re-made freely while untouched, refused once the student has edited a copy.
    folder = tmp_path / "ex"
    assert tool.main(["attention.causal_mask", "--out", str(folder)]) == 0
    assert tool.main(["attention.attention_forward", "--out", str(folder)]) == 0
    (folder / "attention.py").write_text((folder / "attention.py").read_text() + "# my work\n")
    refused(folder, "attention.py changed since tools/exercise.py wrote them")
    link = tmp_path / "linked"
    assert tool.main(["training.adam_step", "--out", str(link)]) == 0
    (link / "attention.py").unlink()
    (link / "attention.py").symlink_to(tmp_path / "elsewhere.py")
    refused(link, "attention.py is a symbolic link")
    capsys.readouterr()
