"""Tests for training.py, what they prove (each PyTorch claim is also checked without torch):

- the embedding's and cross-entropy's gradients (with ignore_index and label smoothing) match finite
  differences; smoothing gives eps / V to every class as PyTorch does (a hand-computed example, and
  torch.nn.functional.cross_entropy where installed); ignored positions leave the mean;
- AdamW: the update written out by hand over several steps; eps sits outside sqrt(v_hat) (a case where
  the placements differ by 9x); decay is decoupled and decay=None shrinks every leaf, vectors included,
  by exactly 1 - lr wd; the first step moves each parameter by about lr; torch.optim.AdamW with decay
  groups where installed, float64 and float32;
- clipping by global norm (= clip_grad_norm_), its behaviour at norm 0 and at exactly max_norm; the
  schedule's values at its boundaries;
- the shared checks every model file uses (check_tree, check_rng, check_positive_int) name the first
  missing, extra or mis-shaped leaf by its path; every wrong call (a state or grads from another tree,
  integer parameters, a bad decay tree) is refused by name.
"""
import ast
import math
import sys

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import training
from gradcheck import check_gradients
from helpers import ROOT, random_array, to_numpy


def ids_with_a_repeat(rng, B, T, V, xp=np):
    """Random ids (B, T) in [0, V) where the first two positions share an id (a row used twice)."""
    ids = rng.integers(0, V, size=(B, T))
    ids.reshape(-1)[1] = ids.reshape(-1)[0]
    return xp.asarray(ids)


# ----------------------------------------------------------------------------------------------------
# Params trees


def test_tree_map_keeps_the_first_trees_structure_and_refuses_trees_of_another_structure():
    tree = {"a": [1.0, (2.0, 3.0)], "b": 4.0}
    assert training.tree_map(lambda x, y: x + 10 * y, tree, tree) == {"a": [11.0, (22.0, 33.0)], "b": 44.0}
    for other, message in [({"a": [1, (2, 3)]}, r"keys \['a', 'b'\], got \['a'\]"),
                           ({"a": [1, (2,)], "b": 4}, "a list of length 2, got length 1"),
                           ({"a": 1, "b": 4}, "a list of length 2, got int"),
                           ([1, 2], r"keys \['a', 'b'\], got list")]:
        with pytest.raises(ValueError, match="trees must have the same structure: " + message):
            training.tree_map(lambda x, y: x, tree, other)


def test_tree_leaves_sorts_dict_keys_so_trees_built_in_another_order_line_up():
    assert training.tree_leaves({"b": 3, "a": [1, (2,)]}) == [1, 2, 3]
    assert training.tree_leaves({"a": [1, (2,)], "b": 3}) == [1, 2, 3]


def test_training_imports_no_project_file():
    # A student copies training.py beside any model file: it must stand alone.
    tree = ast.parse((ROOT / "training.py").read_text())
    project = {path.stem for path in ROOT.glob("*.py")}
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & project


# ----------------------------------------------------------------------------------------------------
# The embedding


def test_embedding_gradient_matches_finite_differences(xp):
    rng = np.random.default_rng(0)
    table = random_array(rng, (5, 3), xp=xp)
    ids = ids_with_a_repeat(rng, 2, 4, 5, xp)
    dx = random_array(rng, (2, 4, 3), xp=xp)                   # random upstream gradient
    x, cache = training.embedding_forward(ids, table)
    xp.testing.assert_array_equal(x, table[ids])
    dtable = training.embedding_backward(dx, cache)
    check_gradients(lambda: float((training.embedding_forward(ids, table)[0] * dx).sum()), table, dtable)


def test_embedding_equals_one_hot_ids_times_the_table_and_its_gradient_the_transposed_product():
    rng = np.random.default_rng(10)
    table, ids, dx = rng.standard_normal((5, 3)), ids_with_a_repeat(rng, 2, 4, 5), rng.standard_normal((2, 4, 3))
    one_hot = np.eye(5)[ids]                                   # (B, T, V)
    x, cache = training.embedding_forward(ids, table)
    np.testing.assert_array_equal(x, one_hot @ table)          # products with 0 and 1 only: exact
    # The same sums in another order: rounding only.
    np.testing.assert_allclose(training.embedding_backward(dx, cache),
                               one_hot.reshape(-1, 5).T @ dx.reshape(-1, 3), rtol=1e-14, atol=1e-15)


def test_embedding_backward_sums_the_gradients_of_a_row_used_twice_and_keeps_float32(xp):
    table = xp.zeros((4, 2), dtype=np.float32)
    ids = xp.asarray(np.array([[1, 3, 1]]))
    dx = xp.asarray(np.array([[[1.0, 2.0], [10.0, 20.0], [100.0, 200.0]]], dtype=np.float32))
    dtable = training.embedding_backward(dx, training.embedding_forward(ids, table)[1])
    assert dtable.dtype == np.float32
    np.testing.assert_array_equal(to_numpy(dtable), [[0, 0], [101, 202], [0, 0], [10, 20]])


def test_embedding_refuses_bad_ids_tables_and_upstream_gradients():
    table = np.zeros((4, 2))
    with pytest.raises(TypeError, match="ids must be an integer array of token ids, got float64"):
        training.embedding_forward(np.zeros((1, 2)), table)
    with pytest.raises(ValueError, match=r"ids must hold ids in \[0, 4\), got values in \[-1, 2\]"):
        training.embedding_forward(np.array([[-1, 2]]), table)
    with pytest.raises(ValueError, match=r"ids must have shape \(B, T\), got \(2,\)"):
        training.embedding_forward(np.array([0, 1]), table)
    with pytest.raises(TypeError, match="table must be a floating-point array"):
        training.embedding_forward(np.array([[0, 1]]), np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="table must be a floating-point array"):
        training.embedding_forward(np.array([[0, 1]]), [[0.0, 1.0]] * 4)
    with pytest.raises(TypeError, match=r"table must be .* with V >= 1, got float64 array of shape \(0, 2\)"):
        training.embedding_forward(np.zeros((1, 0), dtype=int), np.zeros((0, 2)))   # no vocabulary at all
    _, cache = training.embedding_forward(np.array([[0, 1]]), table)
    with pytest.raises(ValueError, match=r"dx must have shape \(1, 2, 2\) \(the forward output's\), got \(1, 2\)"):
        training.embedding_backward(np.zeros((1, 2)), cache)
    with pytest.raises(TypeError, match="dx must have dtype float64 .*, got float32"):
        training.embedding_backward(np.zeros((1, 2, 2), dtype=np.float32), cache)
    with pytest.raises(TypeError, match=r"cache must be the dict embedding_forward returned .*, got ndarray"):
        training.embedding_backward(np.zeros((1, 2, 2)), np.array([[0, 1]]))   # the old (dx, ids, V) call


# ----------------------------------------------------------------------------------------------------
# Cross-entropy


def ce_case(rng, xp=np, B=2, T=3, V=4, ignore_index=-100, n_ignored=2, dtype=np.float64):
    """Random logits (B, T, V) and targets (B, T), the first n_ignored positions set to ignore_index."""
    logits = random_array(rng, (B, T, V), dtype, xp) * 2
    targets = rng.integers(0, V, size=(B, T))
    targets.reshape(-1)[:n_ignored] = ignore_index
    return logits, xp.asarray(targets)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [-100, 2], ids=["ignore-100", "ignore-class-2"])
def test_cross_entropy_gradient_matches_finite_differences(xp, label_smoothing, ignore_index):
    rng = np.random.default_rng(1)
    logits, targets = ce_case(rng, xp, ignore_index=ignore_index)
    dloss = float(rng.standard_normal())                      # random upstream gradient of the scalar loss
    options = dict(ignore_index=ignore_index, label_smoothing=label_smoothing)
    _, cache = training.cross_entropy_forward(logits, targets, **options)
    dlogits = training.cross_entropy_backward(dloss, cache)
    assert not bool(xp.any(dlogits[0, :2]))                   # ignored positions get no gradient
    check_gradients(lambda: dloss * training.cross_entropy_forward(logits, targets, **options)[0],
                    logits, dlogits)


def test_label_smoothing_is_pytorchs_eps_over_v_to_every_class_on_a_hand_computed_example():
    # logits [ln 3, 0]: softmax = [3/4, 1/4]. Target 0, eps = 0.2, V = 2: PyTorch's target distribution is
    # [1 - eps + eps/V, eps/V] = [0.9, 0.1] (eps/(V-1) would give [0.8, 0.2]).
    logits = np.array([[math.log(3.0), 0.0]])
    loss, cache = training.cross_entropy_forward(logits, np.array([0]), label_smoothing=0.2)
    assert loss == pytest.approx(-(0.9 * math.log(0.75) + 0.1 * math.log(0.25)), rel=1e-15)
    dlogits = training.cross_entropy_backward(1.0, cache)
    np.testing.assert_allclose(dlogits, [[0.75 - 0.9, 0.25 - 0.1]], rtol=1e-14)   # softmax - target distribution


def test_ignored_positions_are_left_out_of_the_mean():
    rng = np.random.default_rng(2)
    logits, targets = ce_case(rng, n_ignored=3, B=2, T=4)
    for eps in (0.0, 0.3):
        loss, _ = training.cross_entropy_forward(logits, targets, label_smoothing=eps)
        kept, _ = training.cross_entropy_forward(logits.reshape(-1, 4)[3:], targets.reshape(-1)[3:],
                                                 label_smoothing=eps)   # the 5 kept positions alone
        assert loss == pytest.approx(kept, rel=1e-14)


def test_cross_entropy_without_smoothing_is_minus_the_mean_log_probability_of_the_target():
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    loss, _ = training.cross_entropy_forward(logits, np.array([3, 0]))
    expected = (math.log(4) + (math.log(math.e ** 2 + 3) - 2)) / 2
    assert loss == pytest.approx(expected, rel=1e-15)


def test_every_position_ignored_gives_zero_loss_and_zero_gradient_not_nan(xp):
    logits = random_array(np.random.default_rng(3), (2, 3, 5), xp=xp)
    targets = xp.full((2, 3), -100)
    loss, cache = training.cross_entropy_forward(logits, targets, label_smoothing=0.1)
    dlogits = training.cross_entropy_backward(1.0, cache)
    assert loss == 0.0 and dlogits.shape == (2, 3, 5) and not bool(xp.any(dlogits))


def test_cross_entropy_keeps_float32_and_huge_logits_stay_finite(xp):
    logits = xp.asarray(np.array([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]], dtype=np.float32))
    loss, cache = training.cross_entropy_forward(logits, xp.asarray(np.array([0, 1])), label_smoothing=0.1)
    dlogits = training.cross_entropy_backward(np.float32(2.0), cache)
    assert dlogits.dtype == np.float32 and math.isfinite(loss) and bool(xp.all(xp.isfinite(dlogits)))


def test_log_softmax_is_z_minus_log_sum_exp_z_and_ignores_a_shift_of_the_row():
    z = np.array([[0.5, -1.0, 2.0], [3.0, 3.0, 3.0]])
    naive = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # fine for small z
    # Subtracting the row max first changes the rounding, not the value: a few eps64.
    np.testing.assert_allclose(training.log_softmax(z), naive, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(training.log_softmax(z + 100.0), naive, rtol=1e-14, atol=1e-13)


def test_cross_entropy_returns_a_python_float_and_the_cache_its_docstring_lists():
    logits = np.array([[0.0, math.log(3.0)], [1.0, 1.0], [2.0, 0.0]])
    loss, cache = training.cross_entropy_forward(logits, np.array([1, -100, 0]), label_smoothing=0.1)
    assert type(loss) is float and set(cache) == {"probs", "targets", "keep", "count", "label_smoothing"}
    # exp(log-softmax) against exp / sum: each path rounds exp, log and a division a few times (~10 eps).
    np.testing.assert_allclose(cache["probs"], np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), rtol=1e-14)
    np.testing.assert_array_equal(cache["targets"], [1, 0, 0])  # the ignored position reads class 0
    np.testing.assert_array_equal(cache["keep"], [True, False, True])
    assert cache["count"] == 2 and cache["label_smoothing"] == 0.1


def test_log_softmax_stays_finite_for_huge_inputs_and_keeps_float32():
    logp = training.log_softmax(np.array([-1e4, 0.0, 1e4], dtype=np.float32))   # exp(1e4) would overflow
    assert logp.dtype == np.float32 and np.isfinite(logp).all() and logp[-1] == 0.0


@given(V=st.integers(1, 6), eps=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
@example(V=1, eps=1.0, seed=0)
def test_cross_entropy_gradient_rows_sum_to_zero_and_the_loss_is_at_least_the_smoothed_entropy(V, eps, seed):
    # Each kept row of dlogits is (softmax - q) / N, q the smoothed target distribution: both sum to 1.
    rng = np.random.default_rng(seed)
    logits, targets = ce_case(rng, V=V, n_ignored=1)
    loss, cache = training.cross_entropy_forward(logits, targets, label_smoothing=eps)
    dlogits = training.cross_entropy_backward(1.0, cache)
    np.testing.assert_allclose(dlogits.sum(axis=-1), 0, atol=1e-15)
    q = np.full(V, eps / V)
    q[0] += 1 - eps
    entropy = -float((q[q > 0] * np.log(q[q > 0])).sum())    # cross-entropy >= entropy of the target
    assert loss >= entropy - 1e-12


def test_cross_entropy_refuses_bad_input():
    logits, targets = np.zeros((2, 3)), np.array([0, 2])
    with pytest.raises(ValueError, match=r"targets must be in \[0, 3\) or ignore_index = -100, got 3"):
        training.cross_entropy_forward(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match=r"targets must be in \[0, 3\) or ignore_index = -100, got -1"):
        training.cross_entropy_forward(logits, np.array([-1, 0]))
    with pytest.raises(TypeError, match="targets must be an integer array, got float64"):
        training.cross_entropy_forward(logits, targets.astype(np.float64))
    with pytest.raises(ValueError, match=r"targets must have shape \(2,\) \(logits without V\), got \(3,\)"):
        training.cross_entropy_forward(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="logits must be a floating-point array"):
        training.cross_entropy_forward(logits.astype(np.int64), targets)
    with pytest.raises(TypeError, match="logits must be a floating-point array"):
        training.cross_entropy_forward(np.zeros((2, 0)), targets)
    for eps in (-0.1, 1.5, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="label_smoothing must be a number in"):
            training.cross_entropy_forward(logits, targets, label_smoothing=eps)
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        training.cross_entropy_forward(logits, targets, ignore_index=None)
    _, cache = training.cross_entropy_forward(logits, targets)
    with pytest.raises(ValueError, match=r"dloss must be a scalar, got shape \(2,\)"):
        training.cross_entropy_backward(np.ones(2), cache)
    with pytest.raises(TypeError, match="dloss must be a real number"):
        training.cross_entropy_backward("1", cache)
    with pytest.raises(TypeError, match=r"cache must be the dict cross_entropy_forward returned .*, got ndarray"):
        training.cross_entropy_backward(1.0, np.ones((2, 3)) / 3)   # probs where the cache belongs


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
@pytest.mark.parametrize("ignore_index, label_smoothing", [(-100, 0.0), (1, 0.0), (-100, 0.25), (1, 0.25)],
                         ids=["plain", "ignore", "smoothing", "both"])
def test_cross_entropy_matches_torch(ignore_index, label_smoothing, dtype, tol):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    logits, targets = ce_case(rng, B=3, T=5, V=6, ignore_index=ignore_index, n_ignored=4, dtype=dtype)
    loss, cache = training.cross_entropy_forward(logits, targets, ignore_index, label_smoothing)
    dlogits = training.cross_entropy_backward(0.7, cache)
    t_logits = torch.tensor(logits, requires_grad=True)
    t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, 6), torch.tensor(targets).reshape(-1),
                                               ignore_index=ignore_index, label_smoothing=label_smoothing)
    (0.7 * t_loss).backward()
    # The same sums in another order: float64 agrees to rounding, float32 to a few eps32 (1.2e-7) of |loss|.
    assert loss == pytest.approx(t_loss.item(), rel=tol)
    np.testing.assert_allclose(dlogits, t_logits.grad.numpy(), rtol=tol, atol=tol * 0.7 / 11)
    assert dlogits.dtype == dtype


# ----------------------------------------------------------------------------------------------------
# Clipping


def test_clip_gradients_rescales_to_max_norm_returns_the_old_norm_and_leaves_grads_alone(xp):
    grads = {"a": xp.asarray(np.array([3.0, 0.0])), "b": [xp.asarray(np.array([[4.0]], dtype=np.float32))]}
    clipped, norm = training.clip_gradients(grads, max_norm=1.0)
    assert norm == 5.0
    np.testing.assert_allclose(to_numpy(clipped["a"]), [0.6, 0.0])
    np.testing.assert_allclose(to_numpy(clipped["b"][0]), [[0.8]], rtol=1e-7)
    assert clipped["b"][0].dtype == np.float32
    assert float(grads["a"][0]) == 3.0                        # the input tree is not modified
    for max_norm in (5.0, 10.0):                               # norm <= max_norm: left exactly as it was
        unclipped, _ = training.clip_gradients(grads, max_norm)
        np.testing.assert_array_equal(to_numpy(unclipped["b"][0]), to_numpy(grads["b"][0]))
    zero, zero_norm = training.clip_gradients({"a": xp.zeros(3)}, 1.0)   # norm 0: no division by zero
    assert zero_norm == 0.0 and not bool(xp.any(zero["a"]))


def test_clip_gradients_matches_torch_clip_grad_norm():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    grads = {"w": rng.standard_normal((3, 4)), "b": [rng.standard_normal(4)]}
    tensors = [torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64)),
               torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))]
    tensors[0].grad, tensors[1].grad = torch.tensor(grads["w"]), torch.tensor(grads["b"][0])
    t_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm=1.0)
    clipped, norm = training.clip_gradients(grads, max_norm=1.0)
    assert norm == pytest.approx(t_norm.item(), rel=1e-14)
    # torch divides by norm + 1e-6: a relative difference of 1e-6 / norm in the clipped values.
    for ours, theirs in zip((clipped["w"], clipped["b"][0]), tensors):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-6 / norm * 1.01 + 1e-15)


@pytest.mark.parametrize("max_norm", [0, -1.0, float("nan"), None, True])
def test_clip_gradients_refuses_a_max_norm_that_is_not_positive(max_norm):
    with pytest.raises(ValueError, match="max_norm must be a positive number"):
        training.clip_gradients({"a": np.ones(2)}, max_norm)


@pytest.mark.parametrize("grads, message", [
    ({"a": None}, r"grads\['a'\] must be a floating-point array, got NoneType"),
    ([np.ones(2, dtype=np.int64)], r"grads\[0\] must be a floating-point array, got int64 array of shape \(2,\)"),
    ({"a": [np.ones(2), "x"]}, r"grads\['a'\]\[1\] must be a floating-point array, got str"),
    ({"a": np.ones(2, dtype=bool)}, r"grads\['a'\] must be a floating-point array, got bool array"),
])
def test_clip_gradients_refuses_a_tree_whose_leaves_are_not_float_arrays_naming_the_leaf(grads, message):
    with pytest.raises(TypeError, match=message):
        training.clip_gradients(grads, 1.0)


# ----------------------------------------------------------------------------------------------------
# Adam and AdamW


def model_like_params(rng, dtype=np.float64):
    """A tree with every kind of leaf: matrices and a table (decay), biases and LayerNorm gamma/beta (no decay)."""
    return {"embed": rng.standard_normal((5, 3)).astype(dtype),
            "layers": [{"W": rng.standard_normal((3, 3)).astype(dtype), "b": rng.standard_normal(3).astype(dtype),
                        "ln": {"gamma": (1 + 0.1 * rng.standard_normal(3)).astype(dtype),
                               "beta": rng.standard_normal(3).astype(dtype)}}]}


def test_weight_decay_mask_decays_matrices_and_tables_not_biases_or_layer_norm():
    mask = training.weight_decay_mask(model_like_params(np.random.default_rng(0)))
    assert mask == {"embed": True, "layers": [{"W": True, "b": False, "ln": {"gamma": False, "beta": False}}]}


def test_first_adam_step_moves_every_parameter_by_about_lr_against_its_gradient():
    rng = np.random.default_rng(6)
    params = model_like_params(rng)
    grads = training.tree_map(lambda p: rng.choice([-1, 1], p.shape) * rng.uniform(0.5, 2, p.shape), params)
    new, state = training.adam_step(params, grads, training.adam_init(params), lr=0.01)
    # m_hat = g and v_hat = g^2 after one step, so p moves by lr * g / (|g| + eps): |g| >= 0.5 puts that
    # within lr * 2e-8 of lr * sign(g).
    for p, g, q in zip(*(training.tree_leaves(t) for t in (params, grads, new))):
        np.testing.assert_allclose(q - p, -0.01 * np.sign(g), rtol=1e-7)
    assert state["t"] == 1


def adam_by_hand(p, gradients, lr, beta1, beta2, eps, weight_decay=0.0):
    """AdamW on one float64 array, line by line as torch.optim.AdamW's documentation writes its algorithm:
    decay by lr * wd, the moments, the bias-corrected moments, then eps added to sqrt(v_hat) (Adam's paper)."""
    m = v = np.zeros_like(p)
    for t, g in enumerate(gradients, start=1):
        p = p - lr * weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adam_matches_the_update_written_out_by_hand_over_three_steps_with_decay():
    rng = np.random.default_rng(12)
    p = rng.standard_normal((4, 5))
    # Gradients from 1e-4 to 1 against eps = 1e-3: where eps sits and which moments are corrected both
    # move the result far beyond rounding; betas far from 1 make the bias correction large at every step.
    gradients = [rng.standard_normal((4, 5)) * 10.0 ** rng.uniform(-4, 0, (4, 5)) for _ in range(3)]
    options = dict(lr=0.05, beta1=0.7, beta2=0.8, eps=1e-3, weight_decay=0.3)
    params, state = {"W": p}, training.adam_init({"W": p})
    for g in gradients:
        params, state = training.adam_step(params, {"W": g}, state, **options)
    # The same arithmetic grouped as torch groups it: a few roundings of |p| ~ 1.
    np.testing.assert_allclose(params["W"], adam_by_hand(p, gradients, **options), rtol=0, atol=1e-14)
    assert state["t"] == 3


def test_adam_adds_eps_outside_the_square_root_of_the_bias_corrected_second_moment():
    # One step from p = 0 with tiny gradients and a large eps: m_hat = g and v_hat = g^2, so the new p is
    # the step itself, -lr * g / (|g| + eps). Two other readings of "eps" give steps 10x and 30x smaller.
    g, lr, beta2, eps = np.array([1e-6, -3e-6, 2e-6]), 0.1, 0.999, 1e-2
    new, _ = training.adam_step({"p": np.zeros(3)}, {"p": g}, training.adam_init({"p": np.zeros(3)}),
                                lr=lr, beta2=beta2, eps=eps)
    outside = -lr * g / (np.abs(g) + eps)                      # sqrt(v_hat) + eps: Adam's paper and torch
    inside = -lr * g / np.sqrt(g * g + eps)                    # sqrt(v_hat + eps)
    before_correction = -lr * g / (np.sqrt((1 - beta2) * g * g) + eps) * np.sqrt(1 - beta2)  # eps on sqrt(v):
    # the paper's "more efficient" ordering, which moves eps by sqrt(1 - beta2^t)
    np.testing.assert_allclose(new["p"], outside, rtol=1e-14)  # a handful of roundings
    for other in (inside, before_correction):
        assert np.all(np.abs(other) < np.abs(outside) / 9)     # so the test tells them apart by far


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("decay", ["none", "mask"], ids=["decay=None", "decay=weight_decay_mask"])
def test_weight_decay_with_zero_gradients_shrinks_exactly_by_one_minus_lr_wd_the_leaves_decay_names(xp, dtype, decay):
    params = training.tree_map(xp.asarray, model_like_params(np.random.default_rng(7), dtype))
    zeros = training.tree_map(lambda p: p * 0, params)
    mask = training.weight_decay_mask(params) if decay == "mask" else None
    new, _ = training.adam_step(params, zeros, training.adam_init(params), lr=0.1, weight_decay=0.5, decay=mask)
    for p, q in zip(training.tree_leaves(params), training.tree_leaves(new)):
        assert q.dtype == dtype
        shrinks = decay == "none" or p.ndim >= 2               # None decays every leaf, vectors included
        # m = v = 0, so the Adam update is 0 / (0 + eps) = 0: only the decay p * (1 - lr wd) remains.
        np.testing.assert_array_equal(to_numpy(q), to_numpy(p * (1 - 0.1 * 0.5) if shrinks else p))


def test_weight_decay_is_decoupled_it_shrinks_p_and_leaves_the_moments_and_the_gradient_step_alone():
    rng = np.random.default_rng(13)
    params = model_like_params(rng)
    grads = training.tree_map(lambda p: rng.standard_normal(p.shape), params)
    _, state = training.adam_step(params, grads, training.adam_init(params))   # moments no longer zero
    with_decay, decayed_state = training.adam_step(params, grads, state, lr=0.1, weight_decay=0.5)
    without, plain_state = training.adam_step(params, grads, state, lr=0.1)
    for p, a, b in zip(*(training.tree_leaves(t) for t in (params, with_decay, without))):
        # (p (1 - lr wd) - step) - (p - step) = -lr wd p, up to the rounding of |p| ~ 1
        np.testing.assert_allclose(a - b, -0.1 * 0.5 * p, rtol=0, atol=1e-15)
    # L2 regularisation (wd p added to g) would have changed m and v; decoupled decay does not.
    for a, b in zip(training.tree_leaves(decayed_state), training.tree_leaves(plain_state)):
        np.testing.assert_array_equal(a, b)


def test_adam_init_starts_from_zero_moments_at_t_0_even_for_nan_or_inf_params(xp):
    params = {"W": xp.asarray(np.array([[np.nan, np.inf]])), "b": [xp.ones(3, dtype=np.float32)]}
    state = training.adam_init(params)
    assert state["t"] == 0
    for p, m, v in zip(*(training.tree_leaves(t) for t in (params, state["m"], state["v"]))):
        assert m.shape == v.shape == p.shape and m.dtype == v.dtype == p.dtype
        assert not bool(xp.any(m)) and not bool(xp.any(v))    # zeros, not p * 0 (which is nan here)


def test_adam_step_changes_nothing_it_is_given_and_keeps_float32(xp):
    rng = np.random.default_rng(8)
    params = training.tree_map(xp.asarray, model_like_params(rng, np.float32))
    grads = training.tree_map(lambda p: p * 0.5 + 1, params)
    state = training.adam_init(params)
    before = [to_numpy(a).copy() for a in training.tree_leaves((params, grads, state["m"], state["v"]))]
    new, new_state = training.adam_step(params, grads, state, lr=0.1, weight_decay=0.1)
    after = [to_numpy(a) for a in training.tree_leaves((params, grads, state["m"], state["v"]))]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)) and state["t"] == 0
    assert all(leaf.dtype == np.float32 for leaf in training.tree_leaves((new, new_state["m"], new_state["v"])))


@pytest.mark.parametrize("option, value, message", [
    ("lr", float("nan"), "lr must be a finite number >= 0, got nan"),
    ("lr", -1e-3, "lr must be a finite number >= 0, got -0.001"),
    ("beta1", 1.0, r"beta1 must be in \[0, 1\), got 1.0"),
    ("beta2", -0.1, r"beta2 must be in \[0, 1\), got -0.1"),
    ("eps", 0.0, "eps must be a positive finite number, got 0.0"),
    ("weight_decay", "0.1", "weight_decay must be a finite number >= 0, got '0.1'"),
])
def test_adam_refuses_hyperparameters_out_of_range(option, value, message):
    params = {"W": np.zeros((2, 2))}
    with pytest.raises(ValueError, match=message):
        training.adam_step(params, params, training.adam_init(params), **{option: value})


PARAMS = {"W": np.zeros((2, 2)), "b": np.zeros(2)}
STATE = training.adam_init(PARAMS)


@pytest.mark.parametrize("change, error, message", [
    ({"grads": {"W": np.zeros((2, 2))}}, ValueError, r"grads must have keys \['W', 'b'\]: missing \['b'\]"),
    ({"grads": {**PARAMS, "b": np.zeros(3)}}, ValueError,
     r"grads\['b'\] must be a float64 array of shape \(2,\), got float64 array of shape \(3,\)"),
    ({"grads": {**PARAMS, "b": np.zeros(2, np.float32)}}, ValueError,
     r"grads\['b'\] must be a float64 array .*float32"),
    ({"state": None}, TypeError, r"state must be the dict adam_init or adam_step returned .*, got NoneType"),
    ({"state": training.adam_init({"W": np.zeros((3, 3)), "b": np.zeros(2)})}, ValueError,   # another model's
     r"state\['m'\]\['W'\] must be a float64 array of shape \(2, 2\), got float64 array of shape \(3, 3\)"),
    ({"state": {**STATE, "v": {"W": np.zeros((2, 2))}}}, ValueError, r"state\['v'\] must have keys .*missing \['b'\]"),
    ({"state": {**STATE, "t": -1}}, ValueError, r"state\['t'\] must be an integer >= 0, got -1"),
    ({"state": {**STATE, "t": 1.5}}, ValueError, r"state\['t'\] must be an integer >= 0, got 1.5"),
    ({"decay": {"W": True}}, ValueError, r"decay must mirror params .*: missing \[\"decay\['b'\]\"\], extra \[\]"),
    ({"decay": [True, False]}, ValueError, r"decay must mirror params .*extra \['decay\[0\]', 'decay\[1\]'\]"),
    ({"decay": {"W": True, "b": 1}}, TypeError, r"decay\['b'\] must be True or False, got 1"),
    ({"decay": {"W": "yes", "b": False}}, TypeError, r"decay\['W'\] must be True or False, got 'yes'"),
    ({"params": {"W": np.zeros((2, 2), int), "b": np.zeros(2)}}, TypeError,   # Adam trains floats only
     r"params\['W'\] must be a floating-point array, got int64 array of shape \(2, 2\)"),
    ({"params": {"W": np.zeros((2, 2), bool), "b": np.zeros(2)}}, TypeError, r"params\['W'\] must be a floating-point"),
], ids=["grads-missing-leaf", "grads-shape", "grads-dtype", "state-none", "state-of-another-model",
        "state-v-missing-leaf", "t-negative", "t-float", "decay-missing-leaf", "decay-a-list", "decay-int",
        "decay-str", "params-int", "params-bool"])
def test_adam_refuses_trees_that_do_not_mirror_params_naming_the_leaf(change, error, message):
    arguments = {"params": PARAMS, "grads": PARAMS, "state": STATE, "decay": None, **change}
    with pytest.raises(error, match=message):
        training.adam_step(**arguments)


def test_adam_init_and_weight_decay_mask_refuse_leaves_that_are_not_float_arrays():
    with pytest.raises(TypeError, match=r"params\['W'\]\[0\] must be a floating-point array, got int64 array"):
        training.adam_init({"W": [np.zeros(2, int)]})
    with pytest.raises(TypeError, match=r"params\['b'\] must be a floating-point array, got float"):
        training.weight_decay_mask({"b": 0.5})


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_matches_torch_adamw_step_for_step_with_decay_groups(dtype, weight_decay):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    params = model_like_params(rng, dtype)
    decay = training.weight_decay_mask(params)
    leaves, flags = training.tree_leaves(params), training.tree_leaves(decay)
    tensors = [torch.tensor(p, requires_grad=True) for p in leaves]
    groups = [{"params": [t for t, d in zip(tensors, flags) if d], "weight_decay": weight_decay},
              {"params": [t for t, d in zip(tensors, flags) if not d], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=0.05, betas=(0.8, 0.99), eps=1e-6, foreach=False)
    state = training.adam_init(params)
    steps = 6
    for _ in range(steps):
        grads = training.tree_map(lambda p: rng.standard_normal(p.shape).astype(dtype), params)
        params, state = training.adam_step(params, grads, state, lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6,
                                           weight_decay=weight_decay, decay=decay)
        for t, g in zip(tensors, training.tree_leaves(grads)):
            t.grad = torch.tensor(g)
        optimizer.step()
    # The same operations in the same order; torch's CPU kernels may fuse a multiply-add (lerp_, addcmul_),
    # so each step can differ by a few roundings of |p| and of the update (<= lr * 3): steps * 8 eps * |p|.
    eps = np.finfo(dtype).eps
    for ours, theirs in zip(training.tree_leaves(params), tensors):
        assert ours.dtype == dtype
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=0, atol=steps * 8 * eps * 3)


# ----------------------------------------------------------------------------------------------------
# The learning-rate schedule


def test_schedule_warms_up_linearly_then_decays_along_a_cosine_to_min_lr():
    lr = lambda step: training.lr_schedule(step, max_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert lr(0) == 0.0 and lr(5) == 0.5 and lr(10) == 1.0     # warm-up from 0 to max_lr
    assert lr(60) == pytest.approx(0.55, rel=1e-15)            # half-way through the cosine: (max + min) / 2
    assert lr(35) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-15)
    assert lr(110) == 0.1 and lr(1000) == 0.1                  # min_lr from total_steps on
    values = [lr(step) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))     # never rises after warm-up
    assert lr(9) == pytest.approx(0.9, rel=1e-15)               # the last warm-up step: max_lr * 9 / 10
    assert 0.1 < lr(109) < 0.1 + 0.9 * 1e-3                    # the last cosine step, just above min_lr
    assert training.lr_schedule(0, 0.3, 0, 10) == 0.3          # no warm-up: starts at max_lr
    assert training.lr_schedule(5, 0.3, 5, 5) == 0.0           # warm-up straight into the end
    assert all(type(lr(step)) is float for step in (0, 5, 60, 110))


@pytest.mark.parametrize("args, message", [
    ((-1, 1.0, 10, 100), "step must be an integer >= 0, got -1"),
    ((1.5, 1.0, 10, 100), "step must be an integer >= 0, got 1.5"),
    ((1, 1.0, -2, 100), "warmup_steps must be an integer >= 0, got -2"),
    ((1, 1.0, 10, 5), "total_steps must be >= warmup_steps = 10, got 5"),
    ((0, 1.0, 0, 0), "total_steps must be an integer >= 1, got 0"),
    ((True, 1.0, 10, 100), "step must be an integer >= 0, got True"),
    ((1, 1.0, 10, 100, 2.0), r"min_lr must be in \[0, max_lr = 1.0\], got 2.0"),
    ((1, 1.0, 10, 100, -0.1), r"min_lr must be a finite number >= 0, got -0.1"),
    ((1, "1", 10, 100), r"max_lr must be a finite number >= 0, got '1'"),
    ((1, float("nan"), 10, 100), r"max_lr must be a finite number >= 0, got nan"),
])
def test_schedule_refuses_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        training.lr_schedule(*args)


# ----------------------------------------------------------------------------------------------------
# get_xp and check_ids


def test_get_xp_gives_numpy_without_importing_cupy_and_the_array_module_of_device_arrays(xp, monkeypatch):
    assert training.get_xp(xp.zeros(2)) is xp
    monkeypatch.setitem(sys.modules, "cupy", None)             # as if cupy were never imported
    assert training.get_xp(np.zeros(2)) is np


def test_check_ids_names_the_argument_and_what_it_needs():
    with pytest.raises(TypeError, match="targets must be an integer array of token ids, got bool"):
        training.check_ids("targets", np.zeros((1, 2), dtype=bool), 3)
    with pytest.raises(TypeError, match="ids must be an integer array of token ids, got list"):
        training.check_ids("ids", [[0, 1]], 3)
    with pytest.raises(ValueError, match=r"ids must have shape \(B, T\) = \(1, 3\), got \(1, 2\)"):
        training.check_ids("ids", np.zeros((1, 2), dtype=int), 3, shape=(1, 3))
    training.check_ids("ids", np.zeros((0, 2), dtype=int), 3)   # an empty batch is fine


# ----------------------------------------------------------------------------------------------------
# The shared checks every model file uses


def test_check_tree_names_the_first_missing_extra_or_misshaped_leaf_by_its_path():
    like = {"a": np.zeros((2, 3)), "layers": [{"w": np.zeros(4)}, {"w": np.zeros(4)}]}
    training.check_tree("params", like, like)                                          # itself: accepted
    training.check_tree("params", like, {"a": (2, 3), "layers": [{"w": (4,)}, {"w": (4,)}]})   # shapes only
    cases = [({"a": like["a"]}, r"params must have keys \['a', 'layers'\]: missing \['layers'\], extra \[\]"),
             ({**like, "b": like["a"]}, r"missing \[\], extra \['b'\]"),
             ({**like, "layers": like["layers"][:1]}, r"params\['layers'\] must be a list of length 2, got length 1"),
             ({**like, "layers": [{"w": np.zeros(4)}, {"w": np.zeros(5)}]},
              r"params\['layers'\]\[1\]\['w'\] must be a float64 array of shape \(4,\), got float64 array of shape \(5,\)"),
             ({**like, "a": like["a"].astype(np.float32)}, r"params\['a'\] must be a float64 array"),
             ({**like, "a": np.zeros((2, 3), int)}, r"params\['a'\] must be a float64 array"),
             ({**like, "layers": {"w": 1}}, r"params\['layers'\] must be a list of length 2, got dict")]
    for tree, message in cases:
        with pytest.raises(ValueError, match=message):
            training.check_tree("params", tree, like)
    with pytest.raises(TypeError, match=r"params\['layers'\]\[0\] must be a dict with keys \['w'\], got float64 array"):
        training.check_tree("params", {**like, "layers": [np.zeros(4), {"w": np.zeros(4)}]}, like)
    shapes = {"a": (2,)}                                       # shapes only, with the dtype every leaf must have
    training.check_tree("params", {"a": np.zeros(2, np.float32)}, shapes, dtype=np.float32)
    with pytest.raises(ValueError, match=r"params\['a'\] must be a float64 array of shape \(2,\), got float32"):
        training.check_tree("params", {"a": np.zeros(2, np.float32)}, shapes, dtype=np.float64)


def test_check_rng_and_check_positive_int_name_the_argument():
    training.check_rng(np.random.default_rng(0))
    for rng in (0, np.random.RandomState(0), None):
        with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
            training.check_rng(rng)
    training.check_positive_int("D", 3)
    for value in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=r"D must be an integer >= 1, got"):
            training.check_positive_int("D", value)
    training.check_positive_int("n_new", 0, minimum=0)
