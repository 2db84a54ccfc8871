"""Tests for rnn.py (training.py's tools have tests/test_training.py), what they prove:

- backpropagation through time is right: every backward (tanh RNN, LSTM with and without dc_T, GRU, the
  character model) against finite differences with a random upstream gradient, and against
  torch.nn.RNN/LSTM/GRU with copied weights where torch is installed;
- causality: the output at step t ignores every input after t;
- the gradient-norm measurement: a tanh RNN with ||W_hh|| < 1 decays at least geometrically, with a large
  ||W_hh|| it explodes, an LSTM keeps its gradient with its forget gate held open;
- the character model learns the grammar and samples from it (greedy at temperature 0);
- every wrong call is refused by name: an upstream gradient of another shape or dtype, a params tree for
  another cell or size, a cache from another function, an rng that is not a Generator, sizes of 0.
"""
import ast

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rnn
import training
from gradcheck import check_gradients, random_like
from helpers import ROOT, run_demo

CELLS = ["rnn", "lstm", "gru"]


def make_inputs(xp, cell, B=2, T=3, D=3, Hd=4, seed=0, dtype=np.float64):
    """Random x (B, T, D), initial state tuple and params for `cell`, as `xp` arrays."""
    rng = np.random.default_rng(seed)
    x = xp.asarray(rng.standard_normal((B, T, D)).astype(dtype))
    n_states = 2 if cell == "lstm" else 1                      # (h0,) or (h0, c0)
    state = tuple(xp.asarray(rng.standard_normal((B, Hd)).astype(dtype)) for _ in range(n_states))
    params = {k: xp.asarray(v) for k, v in rnn.init_cell(cell, D, Hd, rng, dtype).items()}
    return x, state, params


def run_forward(cell, x, state, params):
    """The public forward of `cell`: (hs,) or (hs, c_T) for the LSTM."""
    if cell == "rnn":
        return rnn.rnn_forward(x, state[0], params)[:1]
    if cell == "lstm":
        return rnn.lstm_forward(x, state[0], state[1], params)[:2]
    return rnn.gru_forward(x, state[0], params)[:1]


def run_backward(cell, x, state, params, douts):
    """The public backward of `cell` given upstream gradients for run_forward's outputs: dx, dstate, grads."""
    if cell == "rnn":
        _, cache = rnn.rnn_forward(x, state[0], params)
        dx, dh0, grads = rnn.rnn_backward(douts[0], cache)
        return dx, (dh0,), grads
    if cell == "lstm":
        _, _, cache = rnn.lstm_forward(x, state[0], state[1], params)
        dx, dh0, dc0, grads = rnn.lstm_backward(douts[0], cache, douts[1])
        return dx, (dh0, dc0), grads
    _, cache = rnn.gru_forward(x, state[0], params)
    dx, dh0, grads = rnn.gru_backward(douts[0], cache)
    return dx, (dh0,), grads


# ----------------------------------------------------------------------------------------------------
# Gradients of the three cells


@pytest.mark.parametrize("cell", CELLS)
def test_cell_gradients_match_finite_differences_for_inputs_initial_states_and_params(xp, cell):
    x, state, params = make_inputs(xp, cell)
    rng = np.random.default_rng(1)
    douts = [random_like(out, rng) for out in run_forward(cell, x, state, params)]  # random upstream

    def loss():
        return sum(float((out * d).sum()) for out, d in zip(run_forward(cell, x, state, params), douts))

    dx, dstate, grads = run_backward(cell, x, state, params, douts)
    check_gradients(loss, [x, list(state), params], [dx, list(dstate), grads])


def test_lstm_without_dc_T_treats_the_final_cell_gradient_as_zero(xp):
    x, (h0, c0), params = make_inputs(xp, "lstm")
    dhs = xp.asarray(np.random.default_rng(2).standard_normal((2, 3, 4)))
    _, _, cache = rnn.lstm_forward(x, h0, c0, params)
    without = rnn.lstm_backward(dhs, cache)
    with_zero = rnn.lstm_backward(dhs, cache, xp.zeros_like(c0))
    for a, b in zip(without[:3], with_zero[:3]):
        assert xp.array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_cell_interface_passes_the_final_state_gradient_back_to_the_initial_state(xp, cell):
    x, state, params = make_inputs(xp, cell, seed=3)
    rng = np.random.default_rng(4)
    hs, final, _ = rnn.cell_forward(x, state, params, cell)
    dhs, dfinal = random_like(hs, rng), tuple(random_like(s, rng) for s in final)

    def loss():
        hs, final, _ = rnn.cell_forward(x, state, params, cell)
        return float((hs * dhs).sum()) + sum(float((s * d).sum()) for s, d in zip(final, dfinal))

    _, _, cache = rnn.cell_forward(x, state, params, cell)
    dhs_before = dhs.copy()
    dx, dstate, grads = rnn.cell_backward(dhs, cache, dfinal)
    assert xp.array_equal(dhs, dhs_before)                     # the caller's dhs is not modified
    check_gradients(loss, [x, list(state), params], [dx, list(dstate), grads])


# ----------------------------------------------------------------------------------------------------
# Agreement with PyTorch


@pytest.mark.parametrize("cell", CELLS)
def test_cells_match_torch_outputs_and_every_gradient_with_copied_weights(cell):
    torch = pytest.importorskip("torch")
    B, T, D, Hd = 3, 5, 4, 6
    torch.manual_seed(0)
    module = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](
        D, Hd, batch_first=True).double()
    w_ih, w_hh, b_ih, b_hh = (p.detach().numpy().copy() for p in (
        module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0))
    params = {"rnn": {"W_xh": w_ih.T.copy(), "W_hh": w_hh.T.copy(), "b_h": b_ih + b_hh},
              "lstm": {"W_x": w_ih.T.copy(), "W_h": w_hh.T.copy(), "b": b_ih + b_hh},
              "gru": {"W_x": w_ih.T.copy(), "W_h": w_hh.T.copy(), "b_x": b_ih, "b_h": b_hh}}[cell]
    rng = np.random.default_rng(5)
    x, h0, c0 = rng.standard_normal((B, T, D)), rng.standard_normal((B, Hd)), rng.standard_normal((B, Hd))
    dhs, dc_T = rng.standard_normal((B, T, Hd)), rng.standard_normal((B, Hd))
    state = (h0, c0) if cell == "lstm" else (h0,)
    douts = [dhs, dc_T] if cell == "lstm" else [dhs]

    outs = run_forward(cell, x, state, params)
    dx, dstate, grads = run_backward(cell, x, state, params, douts)

    tx = torch.tensor(x, requires_grad=True)
    tstate = [torch.tensor(s[None], requires_grad=True) for s in state]  # torch wants (layers, B, Hd)
    tout, tfinal = module(tx, tuple(tstate) if cell == "lstm" else tstate[0])
    touts = [tout, tfinal[1][0]] if cell == "lstm" else [tout]
    sum((o * torch.tensor(d)).sum() for o, d in zip(touts, douts)).backward()

    # Same float64 arithmetic in a different order: agreement to rounding, ~1e-15.
    def close(ours, theirs):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-10, atol=1e-12)

    for ours, theirs in zip(outs, touts):
        close(ours, theirs)
    close(dx, tx.grad)
    for ours, theirs in zip(dstate, tstate):
        close(ours, theirs.grad[0])
    names = {"rnn": ("W_xh", "W_hh"), "lstm": ("W_x", "W_h"), "gru": ("W_x", "W_h")}[cell]
    close(grads[names[0]], module.weight_ih_l0.grad.T)
    close(grads[names[1]], module.weight_hh_l0.grad.T)
    if cell == "gru":
        close(grads["b_x"], module.bias_ih_l0.grad)
        close(grads["b_h"], module.bias_hh_l0.grad)
    else:                                                      # one bias = bias_ih + bias_hh: same gradient
        close(grads["b_h" if cell == "rnn" else "b"], module.bias_ih_l0.grad)
        close(grads["b_h" if cell == "rnn" else "b"], module.bias_hh_l0.grad)


# ----------------------------------------------------------------------------------------------------
# Properties


@given(cell=st.sampled_from(CELLS), B=st.integers(1, 3), T=st.integers(2, 8), D=st.integers(1, 4),
       Hd=st.integers(1, 5), seed=st.integers(0, 2**16), data=st.data())
def test_outputs_at_step_t_do_not_depend_on_inputs_after_t(xp, cell, B, T, D, Hd, seed, data):
    t = data.draw(st.integers(0, T - 2))
    x, state, params = make_inputs(xp, cell, B, T, D, Hd, seed)
    changed = x.copy()
    changed[:, t + 1:] = xp.asarray(np.random.default_rng(seed + 1).standard_normal((B, T - t - 1, D)))
    before = run_forward(cell, x, state, params)[0]
    after = run_forward(cell, changed, state, params)[0]
    assert xp.array_equal(before[:, :t + 1], after[:, :t + 1])  # exactly equal: not a single bit changes
    assert not xp.array_equal(before[:, t + 1:], after[:, t + 1:])


@pytest.mark.parametrize("cell", CELLS)
def test_float32_in_gives_float32_out_and_inputs_are_not_modified(xp, cell):
    x, state, params = make_inputs(xp, cell, dtype=np.float32)
    copies = [a.copy() for a in (x, *state, *params.values())]
    outs = run_forward(cell, x, state, params)
    douts = [random_like(o, np.random.default_rng(6)) for o in outs]
    dx, dstate, grads = run_backward(cell, x, state, params, douts)
    for a in (*outs, dx, *dstate, *grads.values()):
        assert a.dtype == np.float32
    for a, b in zip((x, *state, *params.values()), copies):
        assert xp.array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_init_draws_pytorch_uniform_with_the_api_shapes(cell):
    D, Hd = 5, 16
    params = rnn.init_cell(cell, D, Hd, np.random.default_rng(0), np.float32)
    shapes = {"rnn": {"W_xh": (D, Hd), "W_hh": (Hd, Hd), "b_h": (Hd,)},
              "lstm": {"W_x": (D, 4 * Hd), "W_h": (Hd, 4 * Hd), "b": (4 * Hd,)},
              "gru": {"W_x": (D, 3 * Hd), "W_h": (Hd, 3 * Hd), "b_x": (3 * Hd,), "b_h": (3 * Hd,)}}[cell]
    assert {k: v.shape for k, v in params.items()} == shapes
    values = np.concatenate([v.ravel() for v in params.values()])
    assert values.dtype == np.float32
    assert np.abs(values).max() <= 1 / np.sqrt(Hd)             # U(-1/sqrt(Hd), 1/sqrt(Hd))
    assert np.abs(values).max() > 0.9 / np.sqrt(Hd)             # and fills that range


def test_lstm_forget_bias_shifts_only_the_f_block():
    Hd = 8
    plain = rnn.init_lstm(3, Hd, np.random.default_rng(0), np.float64)
    shifted = rnn.init_lstm(3, Hd, np.random.default_rng(0), np.float64, forget_bias=3.0)
    np.testing.assert_array_equal(shifted["b"] - plain["b"], np.repeat([0.0, 3.0, 0.0, 0.0], Hd))


def test_sigmoid_stays_finite_for_huge_inputs():
    a = np.array([-1e4, 0.0, 1e4], dtype=np.float32)           # exp(1e4) would overflow (an error here)
    np.testing.assert_array_equal(rnn.sigmoid(a), [0.0, 0.5, 1.0])


# ----------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("cell", CELLS)
def test_bad_inputs_raise_errors_naming_the_argument_and_shapes(cell):
    x, state, params = make_inputs(np, cell)
    first_key = sorted(params)[0]
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, D\).*\(2, 3\)"):
        run_forward(cell, x[:, 0], state, params)
    with pytest.raises(ValueError, match=r"h0 must have shape \(B, Hd\).*\(4,\)"):
        run_forward(cell, x, (state[0][0],) + state[1:], params)
    with pytest.raises(ValueError, match=r"h0 must have shape \(B, Hd\) with B = 2 from x and Hd >= 1, got \(2, 0\)"):
        run_forward(cell, x, tuple(s[:, :0] for s in state), params)
    wide = tuple(np.zeros((2, 5)) for _ in state)               # Hd = 5 but the params are for Hd = 4
    first = {"rnn": r"W_xh'\] must be a float64 array of shape \(3, 5\)", "lstm": r"W_x'\] .* shape \(3, 20\)",
             "gru": r"W_x'\] .* shape \(3, 15\)"}[cell]   # D = 3 from x, Hd = 5 from h0
    with pytest.raises(ValueError, match=r"params\['" + first + r", got float64 array of shape \(3, "):
        run_forward(cell, x, wide, params)
    with pytest.raises(TypeError, match="x must be a floating-point array, got int64"):
        run_forward(cell, x.astype(np.int64), state, params)
    with pytest.raises(TypeError, match=r"h0 must have dtype float64 \(x's\), got float32"):
        run_forward(cell, x, (state[0].astype(np.float32),) + state[1:], params)
    with pytest.raises(ValueError, match=r"params\['.*'\] must be a float64 array of shape .*, got float32 array"):
        run_forward(cell, x, state, {k: v.astype(np.float32) for k, v in params.items()})
    with pytest.raises(ValueError, match=r"params must have keys \[.*\]: missing \[.*'W_h.*\], extra \[\]"):
        run_forward(cell, x, state, {})
    with pytest.raises(ValueError, match=r"params must have keys .*: missing \[\], extra \['extra'\]"):
        run_forward(cell, x, state, dict(params, extra=np.zeros(1)))
    with pytest.raises(TypeError, match=r"params must be a dict with keys .*, got list"):
        run_forward(cell, x, state, list(params.values()))
    with pytest.raises(ValueError, match=rf"params\['{first_key}'\] must be a float64 array of shape .*, got list"):
        run_forward(cell, x, state, dict(params, **{first_key: params[first_key].tolist()}))
    other = "gru" if cell != "gru" else "lstm"                 # another cell's params: refused by key
    with pytest.raises(ValueError, match=r"params must have keys .*: missing .*, extra "):
        run_forward(cell, x, state, rnn.init_cell(other, 3, 4, np.random.default_rng(0), np.float64))
    with pytest.raises(ValueError, match=r"T >= 1"):
        run_forward(cell, x[:, :0], state, params)


def test_lstm_rejects_a_missing_or_misshapen_cell_state():
    x, (h0, c0), params = make_inputs(np, "lstm")
    with pytest.raises(ValueError, match=r"c0 must have shape \(B, Hd\) = \(2, 4\) \(h0's\), got \(2, 3\)"):
        rnn.lstm_forward(x, h0, c0[:, :3], params)
    with pytest.raises(TypeError, match="c0 must be a floating-point array, got NoneType"):
        rnn.lstm_forward(x, h0, None, params)
    with pytest.raises(TypeError, match=r"c0 must have dtype float64 \(x's\), got float32"):
        rnn.lstm_forward(x, h0, c0.astype(np.float32), params)


@pytest.mark.parametrize("cell", CELLS)
def test_backward_refuses_an_upstream_gradient_of_another_shape_or_dtype_or_another_cells_cache(cell):
    x, state, params = make_inputs(np, cell)
    hs, final, wrapped = rnn.cell_forward(x, state, params, cell)
    cache = wrapped["steps"]                                   # the cell's own forward's cache
    backward = {"rnn": rnn.rnn_backward, "lstm": rnn.lstm_backward, "gru": rnn.gru_backward}[cell]
    with pytest.raises(ValueError, match=r"dhs must have shape \(2, 3, 4\) \(the forward output's\), got \(2, 3, 1\)"):
        backward(hs[..., :1], cache)                           # would broadcast silently
    with pytest.raises(ValueError, match=r"dhs must have shape \(2, 3, 4\) .*, got \(1, 2, 3, 4\)"):
        backward(hs[None], cache)                              # an extra axis
    with pytest.raises(TypeError, match="dhs must have dtype float64 .*, got float32"):
        backward(hs.astype(np.float32), cache)                 # would return float32 + float64 = float64
    with pytest.raises(TypeError, match="dhs must be an array of dtype float64, got list"):
        backward(hs.tolist(), cache)
    with pytest.raises(ValueError, match=r"dstate\[0\] must have shape \(2, 4\) .*, got \(4,\)"):
        rnn.cell_backward(hs, wrapped, (final[0][0],) + final[1:])
    with pytest.raises(ValueError, match="dstate must be a tuple of"):
        rnn.cell_backward(hs, wrapped, final[0])
    other = "gru" if cell != "gru" else "rnn"
    _, _, other_cache = rnn.cell_forward(x, rnn.zero_state(other, 2, 4, np, np.float64),
                                         rnn.init_cell(other, 3, 4, np.random.default_rng(0), np.float64), other)
    with pytest.raises(TypeError, match=rf"cache must be the dict {cell}_forward returned .*, got keys"):
        backward(hs, other_cache["steps"])                     # another cell's cache
    with pytest.raises(TypeError, match=r"cache must be the dict .*_forward returned .*, got tuple"):
        backward(hs, tuple(cache.values()))
    with pytest.raises(TypeError, match=rf"cache must be the dict {cell}_forward returned .*, got keys \['cell', 's"):
        backward(hs, wrapped)                                  # cell_forward's cache where the cell's belongs
    with pytest.raises(TypeError, match=r"cache must be the dict cell_forward returned \(keys \['cell', 'steps'\]\)"):
        rnn.cell_backward(hs, cache)                           # and the other way round


def test_lstm_backward_refuses_a_final_cell_gradient_of_another_shape_or_dtype():
    x, (h0, c0), params = make_inputs(np, "lstm")
    hs, c_T, cache = rnn.lstm_forward(x, h0, c0, params)
    with pytest.raises(ValueError, match=r"dc_T must have shape \(2, 4\) .*, got \(4,\)"):
        rnn.lstm_backward(hs, cache, c_T[0])
    with pytest.raises(TypeError, match="dc_T must have dtype float64 .*, got float32"):
        rnn.lstm_backward(hs, cache, c_T.astype(np.float32))


@pytest.mark.parametrize("cell", CELLS)
def test_an_empty_input_width_d_0_runs_forward_and_backward(cell):
    # D = 0 is a valid (if useless) input: the state evolves from h0 and the biases alone.
    x, state, params = make_inputs(np, cell, D=0)
    hs = run_forward(cell, x, state, params)
    dx, _, grads = run_backward(cell, x, state, params, [np.ones_like(out) for out in hs])
    assert dx.shape == (2, 3, 0) and grads[sorted(params)[0]].shape == params[sorted(params)[0]].shape


@pytest.mark.parametrize("init", [rnn.init_rnn, rnn.init_lstm, rnn.init_gru])
def test_init_refuses_sizes_that_are_not_counts_and_rngs_and_dtypes_of_the_wrong_kind(init):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="Hd must be an integer >= 1, got 0"):
        init(3, 0, rng)
    with pytest.raises(ValueError, match="D must be an integer >= 0, got -1"):
        init(-1, 4, rng)
    with pytest.raises(ValueError, match="Hd must be an integer >= 1, got 2.5"):
        init(3, 2.5, rng)
    with pytest.raises(ValueError, match="Hd must be an integer >= 1, got True"):
        init(3, True, rng)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        init(3, 4, 0)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype, got <class 'numpy.int32'>"):
        init(3, 4, rng, np.int32)
    assert init(0, 4, rng)[sorted(init(0, 4, rng))[0]].dtype == np.float32   # D = 0 is allowed


def test_cell_names_and_state_sizes_are_checked():
    with pytest.raises(ValueError, match="cell must be 'rnn', 'lstm' or 'gru', got 'LSTM'"):
        rnn.init_cell("LSTM", 3, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="cell must be 'rnn', 'lstm' or 'gru', got 'transformer'"):
        rnn.zero_state("transformer", 2, 4)
    with pytest.raises(ValueError, match="B must be an integer >= 0, got -1"):
        rnn.zero_state("gru", -1, 4)
    x, state, params = make_inputs(np, "lstm")
    with pytest.raises(ValueError, match=r"state must be a tuple of 2 arrays for 'lstm' \(\(h, c\)\), got length 1"):
        rnn.cell_forward(x, state[:1], params, "lstm")
    with pytest.raises(ValueError, match=r"x must have shape \(T, D\), got \(2, 3, 3\)"):
        rnn.hidden_jacobian_norms(x, params, "lstm")
    with pytest.raises(TypeError, match=r"x must be a floating-point array, got int64"):
        rnn.hidden_jacobian_norms(x[0].astype(np.int64), params, "lstm")
    with pytest.raises(ValueError, match=r"params must be 'rnn' parameters \(with 'W_hh'\), got keys \['W_h', 'W_x'"):
        rnn.hidden_jacobian_norms(x[0], params, "rnn")
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        rnn.init_char_lm(5, 3, 4, np.random.RandomState(0))
    with pytest.raises(ValueError, match="cell must be 'rnn', 'lstm' or 'gru', got 'GRU'"):
        rnn.init_char_lm(5, 3, 4, np.random.default_rng(0), "GRU")
    with pytest.raises(TypeError, match="forget_bias must be a finite number, got nan"):
        rnn.init_lstm(3, 4, np.random.default_rng(0), forget_bias=float("nan"))


# ----------------------------------------------------------------------------------------------------
# The gradient-norm measurement


def rnn_with_spectral_norm(D, Hd, target, seed):
    params = rnn.init_rnn(D, Hd, np.random.default_rng(seed), np.float64)
    return dict(params, W_hh=params["W_hh"] * (target / np.linalg.norm(params["W_hh"], 2)))


@pytest.mark.parametrize("cell", CELLS)
def test_jacobian_norms_equal_the_finite_difference_jacobian(cell, xp):
    T, D, Hd, k = 5, 3, 4, 3
    rng = np.random.default_rng(7)
    x = rng.standard_normal((T, D))
    params = rnn.init_cell(cell, D, Hd, rng, np.float64)
    norms = rnn.hidden_jacobian_norms(xp.asarray(x), training.tree_map(xp.asarray, params), cell)
    assert type(norms) is np.ndarray                           # a few numbers for the host to print or plot
    # The state after T - k steps, then d h_T / d h_{T-k} (c held fixed) by central differences.
    _, start, _ = rnn.cell_forward(x[None, :T - k], rnn.zero_state(cell, 1, Hd, np, np.float64), params, cell)
    jacobian = np.zeros((Hd, Hd))
    for j in range(Hd):
        e = np.zeros((1, Hd))
        e[0, j] = 1e-6
        up = rnn.cell_forward(x[None, T - k:], (start[0] + e,) + start[1:], params, cell)[0][0, -1]
        down = rnn.cell_forward(x[None, T - k:], (start[0] - e,) + start[1:], params, cell)[0][0, -1]
        jacobian[:, j] = (up - down) / 2e-6
    assert norms.shape == (T + 1,) and norms[0] == 1.0
    # Central differences in float64 with eps = 1e-6: about 1e-9 relative error.
    np.testing.assert_allclose(norms[k], np.linalg.norm(jacobian, 2), rtol=1e-7)


@given(seed=st.integers(0, 2**16), spectral=st.floats(0.3, 0.99), Hd=st.integers(2, 12))
def test_rnn_gradient_decays_at_least_geometrically_when_spectral_norm_is_below_one(seed, spectral, Hd):
    T, D = 30, 3
    x = np.random.default_rng(seed).standard_normal((T, D)) * 2
    norms = rnn.hidden_jacobian_norms(x, rnn_with_spectral_norm(D, Hd, spectral, seed), "rnn")
    # ||d h_T / d h_{T-k}|| <= ||W_hh||^k, and each further step back shrinks it by at least ||W_hh||;
    # 1e-12 relative allows for the rounding of the SVD.
    assert np.all(norms <= spectral ** np.arange(T + 1) * (1 + 1e-12))
    assert np.all(norms[1:] <= spectral * norms[:-1] * (1 + 1e-12))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_recurrent_weights_make_the_gradient_explode(seed):
    T, D, Hd = 40, 32, 32
    x = np.random.default_rng(seed).standard_normal((T, D))
    norms = rnn.hidden_jacobian_norms(x, rnn_with_spectral_norm(D, Hd, 6.0, seed), "rnn")
    assert norms[-1] > 1e3                                     # these seeds give 2e4 to 3e5


def test_an_open_forget_gate_keeps_the_lstm_gradient_alive_where_the_default_init_loses_it():
    T, D, Hd = 40, 8, 16
    rng = np.random.default_rng(9)
    x = rng.standard_normal((T, D))
    default = rnn.hidden_jacobian_norms(x, rnn.init_lstm(D, Hd, rng, np.float64), "lstm")
    open_gate = rnn.hidden_jacobian_norms(x, rnn.init_lstm(D, Hd, rng, np.float64, forget_bias=3.0), "lstm")
    assert default[-1] < 1e-4 < 1e-2 < open_gate[-1]


# ----------------------------------------------------------------------------------------------------
# The character language model


def tiny_lm(cell, xp, V=5, E=3, Hd=4, B=2, T=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    params = training.tree_map(xp.asarray, rnn.init_char_lm(V, E, Hd, rng, cell, dtype))
    ids, targets = (xp.asarray(rng.integers(0, V, size=(B, T))) for _ in range(2))
    return params, ids, targets


@pytest.mark.parametrize("cell", CELLS)
def test_char_lm_gradients_match_finite_differences(xp, cell):
    params, ids, targets = tiny_lm(cell, xp)
    _, cache = rnn.char_lm_forward(ids, targets, params, cell)
    grads = rnn.char_lm_backward(1.0, cache)
    check_gradients(lambda: rnn.char_lm_forward(ids, targets, params, cell)[0], params, grads)


def test_char_lm_loss_of_an_untrained_model_is_near_log_v():
    params, ids, targets = tiny_lm("lstm", np, V=50, B=4, T=8)
    loss, _ = rnn.char_lm_forward(ids, targets, params, "lstm")
    assert abs(loss - np.log(50)) < 0.1                        # small init: nearly uniform predictions


@pytest.mark.parametrize("cell", CELLS)
def test_char_lm_training_loss_falls_within_two_hundred_steps(cell):
    rng = np.random.default_rng(11)
    text = rnn.grammar_text(rng, 200)
    chars = sorted(set(text))
    data = np.array([chars.index(c) for c in text])
    params = rnn.init_char_lm(len(chars), 8, 32, rng, cell, np.float32)
    state = training.adam_init(params)
    losses = []
    for _ in range(200):
        offsets = rng.integers(0, len(data) - 17, size=16)
        window = np.stack([data[o:o + 17] for o in offsets])
        loss, cache = rnn.char_lm_forward(window[:, :-1], window[:, 1:], params, cell)
        grads, _ = training.clip_gradients(rnn.char_lm_backward(1.0, cache), 5.0)
        params, state = training.adam_step(params, grads, state, lr=1e-2)
        losses.append(loss)
    # From log(21) ~ 3.0 at the start; the seeded runs end near 0.5-0.65, far from the 1.5 threshold.
    assert np.mean(losses[:5]) > 2.5 and np.mean(losses[-10:]) < 1.5


def test_sampling_is_reproducible_and_stays_in_the_vocabulary(xp):
    params, _, _ = tiny_lm("gru", xp, V=7)
    first = rnn.sample_chars(0, 30, params, "gru", temperature=1.0, rng=np.random.default_rng(0))
    again = rnn.sample_chars(0, 30, params, "gru", temperature=1.0, rng=np.random.default_rng(0))
    assert first == again and len(first) == 30 and all(0 <= i < 7 for i in first)


@pytest.mark.parametrize("cell", CELLS)
def test_sampling_carries_the_state_so_it_matches_the_model_run_over_the_whole_sample(cell):
    params, _, _ = tiny_lm(cell, np, V=6, Hd=8, seed=3)
    params = training.tree_map(lambda w: 5 * w, params)             # larger weights: outputs vary with the state
    params["W_out"] = params["W_out"] * 10                     # and clear winners, no near-ties in the logits
    sample = rnn.sample_chars(2, 12, params, cell)             # temperature 0: greedy
    ids = np.array([[2] + sample[:-1]])                        # what the sampler fed itself, (1, 12)
    _, cache = rnn.char_lm_forward(ids, np.array([sample]), params, cell)
    probs = cache["loss"]["probs"]                             # (1, 12, V) from one run over the sequence
    assert len(set(sample)) > 1                                # the sample depends on the state
    assert probs.argmax(axis=-1)[0].tolist() == sample         # greedy: the argmax at every step


def test_sampling_at_low_temperature_picks_the_most_likely_character_and_at_high_spreads_out():
    params, _, _ = tiny_lm("lstm", np, V=6)
    params["b_out"] = np.array([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # character 3 is the most likely everywhere
    params["W_out"] = params["W_out"] * 0
    sample = lambda temperature: rnn.sample_chars(0, 200, params, "lstm", temperature, np.random.default_rng(0))
    assert sample(0.01) == [3] * 200                           # softmax(logits / 0.01): 3 with p > 1 - 1e-40
    # At temperature 100 the six classes are within 1 % of uniform: all appear in 200 draws (p of one
    # missing < 6 (5/6)^200 ~ 1e-15).
    assert set(sample(100.0)) == set(range(6))


def test_char_lm_rejects_float_ids_out_of_range_ids_and_mismatched_targets():
    params, ids, targets = tiny_lm("rnn", np)
    with pytest.raises(TypeError, match="ids must be an integer array"):
        rnn.char_lm_forward(ids.astype(np.float64), targets, params, "rnn")
    with pytest.raises(ValueError, match=r"targets must hold ids in \[0, 5\), got values in \[0, 9\]"):
        rnn.char_lm_forward(ids, np.where(targets == targets.max(), 9, 0), params, "rnn")
    with pytest.raises(ValueError, match=r"targets must have shape \(B, T\) = \(2, 4\), got \(2, 3\)"):
        rnn.char_lm_forward(ids, targets[:, :3], params, "rnn")


def test_demo_runs_and_checks_its_measurements():
    # python rnn.py: trains the char LSTM and prints the gradient-norm table, asserting both (about 5 s of CPU).
    # It writes nothing: its figure is figures/make_figures.py's rnn_gradient_norms (tests/test_figures.py).
    result = run_demo("rnn.py", timeout=300)
    assert "How much gradient reaches h_t from h_T" in result.stdout


def test_rnn_py_imports_only_training_py_names_it_at_the_top_and_keeps_no_plotting_code():
    source = (ROOT / "rnn.py").read_text()
    tree = ast.parse(source)
    project = {path.stem for path in ROOT.glob("*.py")}
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported & project == {"training"} and "matplotlib" not in imported
    assert "Imports training.py" in ast.get_docstring(tree)
    assert "matplotlib" not in source and "--figure" not in source


def test_char_lm_and_sampling_refuse_bad_params_and_arguments():
    params, ids, targets = tiny_lm("gru", np)
    with pytest.raises(TypeError, match=r"params must be init_char_lm's dict .*, got list"):
        rnn.char_lm_forward(ids, targets, list(params.values()), "gru")
    with pytest.raises(TypeError, match=r"params must be init_char_lm's dict .*, got keys \['b_out', 'core', 'e"):
        rnn.char_lm_forward(ids, targets, {k: v for k, v in params.items() if k != "W_out"}, "gru")
    with pytest.raises(ValueError, match=r"params\['W_out'\] must be a float64 array of shape \(4, 5\), got .*4\)"):
        rnn.char_lm_forward(ids, targets, dict(params, W_out=params["W_out"][:, :4]), "gru")
    with pytest.raises(ValueError, match=r"params\['b_out'\] must be a float64 array of shape \(5,\), got float32"):
        rnn.char_lm_forward(ids, targets, dict(params, b_out=params["b_out"].astype(np.float32)), "gru")
    with pytest.raises(ValueError, match=r"params\['core'\] must have keys \['W_h', 'W_x', 'b'\]: missing \['b'\], "
                                         r"extra \['b_h', 'b_x'\]"):
        rnn.char_lm_forward(ids, targets, params, "lstm")      # a GRU model run as an LSTM
    with pytest.raises(ValueError, match=r"params\['core'\]\['W_x'\] must be a float64 array of shape \(3, 12\)"):
        rnn.sample_chars(0, 3, dict(params, core=tiny_lm("gru", np, E=2)[0]["core"]), "gru")
    with pytest.raises(ValueError, match=r"first_id must be in \[0, 5\), got 5"):
        rnn.sample_chars(5, 3, params, "gru")
    with pytest.raises(ValueError, match="n_new must be an integer >= 0, got -1"):
        rnn.sample_chars(0, -1, params, "gru")
    for temperature in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(0: greedy\)"):
            rnn.sample_chars(0, 3, params, "gru", temperature, np.random.default_rng(0))
    with pytest.raises(ValueError, match="V must be an integer >= 1, got 0"):
        rnn.init_char_lm(0, 3, 4, np.random.default_rng(0))
    for rng in (None, 0, np.random.RandomState(0)):             # sampling (temperature > 0) needs a Generator
        with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
            rnn.sample_chars(0, 3, params, "gru", 1.0, rng)
    with pytest.raises(TypeError, match=r"cache must be the dict char_lm_forward returned .*, got tuple"):
        rnn.char_lm_backward(1.0, (ids, targets))
    x, state, core = make_inputs(np, "gru")
    _, _, core_cache = rnn.cell_forward(x, state, core, "gru")
    with pytest.raises(TypeError, match=r"cache must be the dict char_lm_forward returned .*, got keys \['cell'"):
        rnn.char_lm_backward(1.0, core_cache)                  # another function's cache


@pytest.mark.parametrize("call, error, message", [
    (lambda: rnn.grammar_text(0, 3), TypeError, "rng must be a numpy.random.Generator .*, got int"),
    (lambda: rnn.grammar_text(np.random.RandomState(0), 3), TypeError, "rng must be a numpy.random.Generator"),
    (lambda: rnn.grammar_text(np.random.default_rng(0), 0), ValueError, "n_sentences must be an integer >= 1, got 0"),
    (lambda: rnn.init_char_lm(5, 0, 4, np.random.default_rng(0)), ValueError, "E must be an integer >= 1, got 0"),
    (lambda: rnn.init_char_lm(5, 3, 0, np.random.default_rng(0)), ValueError, "Hd must be an integer >= 1, got 0"),
    (lambda: rnn.zero_state("rnn", 2, 0), ValueError, "Hd must be an integer >= 1, got 0"),
    (lambda: rnn.gradient_norm_curves(T=0), ValueError, "T must be an integer >= 1, got 0"),
    (lambda: rnn.gradient_norm_curves(Hd=0), ValueError, "Hd must be an integer >= 1, got 0"),
    (lambda: rnn.hidden_jacobian_norms(np.zeros((3, 2)), None, "gru"), ValueError,
     r"params must be 'gru' parameters \(with 'W_h'\), got NoneType"),
], ids=["grammar-rng-int", "grammar-rng-RandomState", "grammar-0-sentences", "E-0", "Hd-0", "zero-state-Hd-0",
        "curves-T-0", "curves-Hd-0", "jacobian-params-None"])
def test_rngs_that_are_not_generators_and_sizes_of_0_are_refused_by_name(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_gradient_norm_curves_start_at_one_and_the_tanh_rnn_below_one_stays_under_its_bound():
    curves = rnn.gradient_norm_curves(T=8, D=3, Hd=4, spectral_norms=(0.5, 3.0), seed=1)
    assert list(curves) == ["tanh RNN, ||W_hh||_2 = 0.5", "tanh RNN, ||W_hh||_2 = 3.0", "LSTM, PyTorch init",
                            "LSTM, forget bias +3", "GRU, PyTorch init"]
    assert all(norms.shape == (9,) and norms[0] == 1.0 for norms in curves.values())
    # ||J_k|| <= ||W_hh||^k; 1e-12 relative allows for the rounding of the SVD.
    assert np.all(curves["tanh RNN, ||W_hh||_2 = 0.5"] <= 0.5 ** np.arange(9) * (1 + 1e-12))
