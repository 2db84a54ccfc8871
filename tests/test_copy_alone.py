"""Each file works when copied alone with the project files its docstring names.

A student copies one concept file into their coursework, together with the files its top says it needs.
Two checks make that promise hold for every top-level file:

- the docstring's "Imports ..." paragraph names every project file the module imports, directly or
  through another project file (an indirect need left unnamed is the bug a copy would hit first);
- copied into an empty folder with exactly those files, it runs something real there: a forward and a
  backward of its main concept, in a fresh Python whose path holds only that folder.
"""
import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, imported_project_modules

PROJECT = sorted(path.stem for path in ROOT.glob("*.py"))

# What each file runs in its copy: small, but through the public names a student would call.
RUN = {
    "training": """
        import numpy as np, training
        params = {"W": np.ones((2, 2))}
        grads = {"W": np.full((2, 2), 0.5)}
        new, state = training.adam_step(params, grads, training.adam_init(params), lr=0.1)
        loss, cache = training.cross_entropy_forward(np.zeros((1, 3, 5)), np.array([[0, 1, 2]]))
        assert abs(loss - np.log(5)) < 1e-12 and training.cross_entropy_backward(1.0, cache).shape == (1, 3, 5)
    """,
    "erf": """
        import math, numpy as np, erf
        assert abs(float(erf.erf(np.array(0.5))) - math.erf(0.5)) < 1e-15
    """,
    "rnn": """
        import numpy as np, rnn
        rng = np.random.default_rng(0)
        params = rnn.init_gru(3, 4, rng, np.float64)
        hs, cache = rnn.gru_forward(rng.standard_normal((2, 5, 3)), np.zeros((2, 4)), params)
        dx, dh0, grads = rnn.gru_backward(np.ones_like(hs), cache)
        assert dx.shape == (2, 5, 3) and set(grads) == set(params)
    """,
    "attention": """
        import numpy as np, attention
        q = np.random.default_rng(0).standard_normal((2, 4, 8))
        out, cache = attention.attention_forward(q, q, q, causal=True)
        dq, dk, dv = attention.attention_backward(np.ones_like(out), cache)
        assert dq.shape == q.shape
    """,
    "positional": """
        import numpy as np, positional
        x = np.random.default_rng(0).standard_normal((2, 4, 8))
        out, cache = positional.rope_forward(x)
        assert positional.rope_backward(out, cache).shape == x.shape
    """,
    "multihead": """
        import numpy as np, multihead
        rng = np.random.default_rng(0)
        params = multihead.init_multihead(8, rng, np.float64)
        x = rng.standard_normal((2, 4, 8))
        out, cache = multihead.multihead_forward(x, x, params, 2, causal=True)
        dx_q, dx_kv, grads = multihead.multihead_backward(np.ones_like(out), cache)
        assert set(grads) == set(params)
    """,
    "transformer": """
        import numpy as np, transformer
        rng = np.random.default_rng(0)
        config = {"kind": "decoder", "V": 11, "D": 8, "n_heads": 2, "F": 16, "n_layers": 1, "max_len": 8}
        params = transformer.init_transformer(config, rng, np.float64)
        tokens = rng.integers(0, 11, (2, 5))
        loss, cache = transformer.lm_loss_forward(tokens, tokens, params, config)
        grads = transformer.lm_loss_backward(1.0, cache)
        assert set(grads) == set(params)
        new, _ = transformer.generate(tokens[:, :2], 3, params, config)
        assert new.shape == (2, 5)
    """,
    "vit": """
        import numpy as np, vit
        rng = np.random.default_rng(0)
        config = {"image_shape": (1, 8, 8), "P": 4, "D": 8, "n_heads": 2, "F": 16, "n_layers": 1,
                  "n_classes": 2}
        params = vit.init_vit(config, rng, np.float64)
        logits, cache = vit.vit_forward(rng.standard_normal((3, 1, 8, 8)), params, config)
        dimages, grads = vit.vit_backward(np.ones_like(logits), cache)
        assert dimages.shape == (3, 1, 8, 8) and set(grads) == set(params)
    """,
    "flash": """
        import numpy as np, flash
        q = np.random.default_rng(0).standard_normal((2, 5, 8))
        out, cache = flash.flash_attention_forward(q, q, q, causal=True, block_q=2, block_k=3)
        dq, dk, dv = flash.flash_attention_backward(np.ones_like(out), cache)
        assert dv.shape == q.shape
    """,
    "linear_attention": """
        import numpy as np, linear_attention as la
        q = np.random.default_rng(0).standard_normal((2, 5, 8))
        out, cache = la.linear_attention_forward(q, q, q, causal=True)
        dq, dk, dv = la.linear_attention_backward(np.ones_like(out), cache)
        assert dk.shape == q.shape
    """,
}


def named_files(module):
    """The project files the module's docstring names from its line that begins with 'Imports' to the next
    blank line."""
    docstring = ast.get_docstring(ast.parse((ROOT / f"{module}.py").read_text())) or ""
    start = docstring.find("\nImports") + 1 if not docstring.startswith("Imports") else 0
    paragraph = docstring[start:].split("\n\n")[0] if start or docstring.startswith("Imports") else ""
    return {name for name in re.findall(r"\b(\w+)\.py\b", paragraph) if name in PROJECT} - {module}


def direct_imports(module):
    return imported_project_modules(ast.parse((ROOT / f"{module}.py").read_text())) - {module}


def needed_files(module):
    """Every project file the module imports, directly or through another project file."""
    needed, todo = set(), [module]
    while todo:
        for name in direct_imports(todo.pop()) - needed:
            needed.add(name)
            todo.append(name)
    return needed - {module}


def test_every_top_level_file_has_a_copy_alone_check():
    assert set(PROJECT) <= set(RUN), f"no RUN entry for {sorted(set(PROJECT) - set(RUN))}"


@pytest.mark.parametrize("module", PROJECT)
def test_docstring_names_every_project_file_the_module_needs_indirect_ones_included(module):
    docstring = ast.get_docstring(ast.parse((ROOT / f"{module}.py").read_text())) or ""
    assert re.search(r"^Imports", docstring, re.M), (
        f"{module}.py's docstring has no line beginning 'Imports' saying which project files it needs")
    missing = needed_files(module) - named_files(module)
    assert not missing, f"{module}.py needs {sorted(missing)} but its docstring does not name them"


@pytest.mark.parametrize("module", PROJECT)
def test_file_copied_with_the_files_it_names_runs_a_forward_and_backward(module, tmp_path):
    for name in {module} | named_files(module):
        shutil.copy(ROOT / f"{name}.py", tmp_path)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["OPENBLAS_NUM_THREADS"] = "1"
    # -I: isolated mode, so neither the repository nor the user's site folder is on the path; -c runs
    # with the copy folder as the current directory, and -I leaves that off the path too: put it back.
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n" + textwrap.dedent(RUN[module])
    site = [p for p in sys.path if p.endswith("site-packages")]    # NumPy, where the test's Python has it
    code = f"import sys; sys.path.extend({site!r})\n" + code
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"{module}.py copied with {sorted(named_files(module))}:\n{result.stderr}"
