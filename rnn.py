"""Recurrent networks (tanh RNN, LSTM, GRU) with backpropagation through time, by hand.

A recurrent network reads a sequence one step at a time and carries everything it has seen in a
fixed-size hidden state h. Each step needs the previous one, so the T steps cannot run in parallel, and
the gradient from step T back to step t is a product of T - t Jacobians, which shrinks or grows
geometrically (Pascanu et al. 2012, "On the difficulty of training recurrent neural networks",
arXiv:1211.5063). Those two facts, and the fixed-size state, are why attention replaced recurrence.

    tanh RNN (Elman 1990):    h_t = tanh(x_t W_xh + h_{t-1} W_hh + b_h)

    LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000):
        [i, f, g, o] = x_t W_x + h_{t-1} W_h + b           four blocks of Hd, in PyTorch's order
        i, f, o = sigmoid(.)   g = tanh(.)
        c_t = f * c_{t-1} + i * g                           the cell: gradients flow through f, not W_h
        h_t = o * tanh(c_t)

    GRU (Cho et al. 2014, arXiv:1406.1078, in PyTorch's form):
        r = sigmoid(x_t W_xr + b_xr + h_{t-1} W_hr + b_hr)
        z = sigmoid(x_t W_xz + b_xz + h_{t-1} W_hz + b_hz)
        n = tanh(x_t W_xn + b_xn + r * (h_{t-1} W_hn + b_hn))
        h_t = (1 - z) * n + z * h_{t-1}

Backpropagation through time (BPTT) runs the same loop backwards: the gradient reaching h_t is the
upstream dhs[:, t] plus what step t+1 sends back, and the weight gradients sum over all steps.

Gate layouts follow PyTorch, so weights copy across from torch.nn.RNN / LSTM / GRU (batch_first=True):
W_x = weight_ih_l0.T, W_h = weight_hh_l0.T; the RNN's b_h and the LSTM's b are bias_ih + bias_hh; the GRU keeps
b_x = bias_ih and b_h = bias_hh apart, because b_hn sits inside r * (.).

On top: a character-level language model (embedding, recurrent core, softmax cross-entropy, trained with
training.py's clipping and Adam) with sampling, and the measurement of ||d h_T / d h_t|| against T - t
(gradient_norm_curves; figures/make_figures.py draws it, this file draws nothing).

Shapes: B batch, T time steps, D input width, Hd hidden width, V vocabulary.
Imports training.py (the params-tree helpers, the embedding, cross-entropy, clipping and Adam every model
here trains with, and the input checks every model file shares) and no other project file.
Runs on NumPy or CuPy arrays unchanged.
"""
import numpy as np

from training import (adam_init, adam_step, check_cache, check_ids, check_positive_int, check_rng, check_tree,
                      check_upstream, clip_gradients, cross_entropy_backward, cross_entropy_forward, describe,
                      embedding_backward, embedding_forward, get_xp, log_softmax)


def sigmoid(a):
    """1 / (1 + exp(-a)), written as (1 + tanh(a / 2)) / 2 so that no exp() can overflow."""
    xp = get_xp(a)
    return 0.5 * (1 + xp.tanh(0.5 * a))


# ----------------------------------------------------------------------------------------------------
# Parameters


def _uniform(rng, shape, Hd, dtype):
    """PyTorch's init for recurrent layers: every weight and bias ~ U(-1/sqrt(Hd), 1/sqrt(Hd)).

    One difference: PyTorch draws bias_ih and bias_hh separately, so its summed RNN/LSTM bias spans
    +-2/sqrt(Hd); here b_h and b are a single draw, half as wide (the GRU's b_x, b_h are as PyTorch's).
    """
    bound = 1.0 / np.sqrt(Hd)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def init_rnn(D, Hd, rng, dtype=np.float32):
    """{'W_xh' (D, Hd), 'W_hh' (Hd, Hd), 'b_h' (Hd,)}, PyTorch's U(-1/sqrt(Hd), 1/sqrt(Hd))."""
    _check_init(D, Hd, rng, dtype)
    return {"W_xh": _uniform(rng, (D, Hd), Hd, dtype), "W_hh": _uniform(rng, (Hd, Hd), Hd, dtype),
            "b_h": _uniform(rng, (Hd,), Hd, dtype)}


def init_lstm(D, Hd, rng, dtype=np.float32, forget_bias=0.0):
    """{'W_x' (D, 4Hd), 'W_h' (Hd, 4Hd), 'b' (4Hd,)}, gates i, f, g, o; PyTorch's uniform init.

    forget_bias is added to the f block of b: a positive value starts f = sigmoid(.) near 1, so the cell
    keeps its contents (Gers et al. 2000; Jozefowicz et al. 2015 recommend 1). PyTorch's init is 0.
    """
    _check_init(D, Hd, rng, dtype)
    if not isinstance(forget_bias, (int, float)) or isinstance(forget_bias, bool) or not np.isfinite(forget_bias):
        raise TypeError(f"forget_bias must be a finite number, got {forget_bias!r}")
    b = _uniform(rng, (4 * Hd,), Hd, dtype)
    b[Hd:2 * Hd] += forget_bias
    return {"W_x": _uniform(rng, (D, 4 * Hd), Hd, dtype), "W_h": _uniform(rng, (Hd, 4 * Hd), Hd, dtype),
            "b": b}


def init_gru(D, Hd, rng, dtype=np.float32):
    """{'W_x' (D, 3Hd), 'W_h' (Hd, 3Hd), 'b_x' (3Hd,), 'b_h' (3Hd,)}, gates r, z, n; PyTorch's init."""
    _check_init(D, Hd, rng, dtype)
    return {"W_x": _uniform(rng, (D, 3 * Hd), Hd, dtype), "W_h": _uniform(rng, (Hd, 3 * Hd), Hd, dtype),
            "b_x": _uniform(rng, (3 * Hd,), Hd, dtype), "b_h": _uniform(rng, (3 * Hd,), Hd, dtype)}


def _previous_states(h0, hs):
    """h_{t-1} for every t: (B, T, Hd) = [h0, h_1, ..., h_{T-1}]."""
    xp = get_xp(hs)
    return xp.concatenate([h0[:, None], hs[:, :-1]], axis=1)


def matmul_over_time(a, b):
    """sum over B and T of a^T b: (B, T, P), (B, T, Q) -> (P, Q), a weight gradient summed over all steps."""
    steps = a.shape[0] * a.shape[1]                            # B T (a -1 could not be solved for P = 0)
    return a.reshape(steps, a.shape[-1]).T @ b.reshape(steps, b.shape[-1])


# ----------------------------------------------------------------------------------------------------
# Vanilla tanh RNN


def rnn_forward(x, h0, params):
    """h_t = tanh(x_t W_xh + h_{t-1} W_hh + b_h), t = 1..T.

    x (B, T, D), h0 (B, Hd), params {'W_xh' (D, Hd), 'W_hh' (Hd, Hd), 'b_h' (Hd,)}.
    Returns hs (B, T, Hd) (the last state is hs[:, -1]) and cache = {'x', 'h0', 'hs', 'params'}: the
    inputs and every state, which are all BPTT needs (tanh' = 1 - h^2 comes from the states).
    """
    _check_inputs("rnn", x, h0, params)
    xp = get_xp(x)
    W_xh, W_hh, b_h = params["W_xh"], params["W_hh"], params["b_h"]
    x_part = x @ W_xh + b_h                                    # (B, T, Hd) all steps at once: no recurrence
    hs = xp.empty(x.shape[:2] + h0.shape[1:], dtype=x.dtype)   # (B, T, Hd)
    h = h0                                                     # (B, Hd)
    for t in range(x.shape[1]):                                # the sequential part: step t needs h_{t-1}
        h = xp.tanh(x_part[:, t] + h @ W_hh)                   # (B, Hd)
        hs[:, t] = h
    return hs, {"x": x, "h0": h0, "hs": hs, "params": params}


def rnn_backward(dhs, cache):
    """BPTT for rnn_forward: dx, dh0, grads {'W_xh', 'W_hh', 'b_h'}, given dhs (B, T, Hd).

    With a_t = x_t W_xh + h_{t-1} W_hh + b_h:  da_t = dh_t * (1 - h_t^2),  dh_{t-1} += da_t W_hh^T.
    """
    check_cache(cache, "rnn_forward", {"x", "h0", "hs", "params"})
    x, h0, hs, params = cache["x"], cache["h0"], cache["hs"], cache["params"]
    check_upstream("dhs", dhs, hs.shape, hs.dtype)
    xp = get_xp(dhs)
    da = xp.empty_like(hs)                                     # (B, T, Hd) gradient of the pre-activation a_t
    dh_next = xp.zeros_like(h0)                                # (B, Hd) what step t+1 sends back to h_t
    for t in reversed(range(x.shape[1])):
        dh = dhs[:, t] + dh_next                               # h_t feeds the output and step t+1: sum
        da[:, t] = dh * (1 - hs[:, t] ** 2)                    # h_t = tanh(a_t)
        dh_next = da[:, t] @ params["W_hh"].T                  # a_t = ... + h_{t-1} W_hh
    grads = {"W_xh": matmul_over_time(x, da),                 # (D, Hd)  summed over every step
             "W_hh": matmul_over_time(_previous_states(h0, hs), da),  # (Hd, Hd)
             "b_h": da.sum(axis=(0, 1))}                       # (Hd,)
    return da @ params["W_xh"].T, dh_next, grads              # dx (B, T, D), dh0 (B, Hd)


# ----------------------------------------------------------------------------------------------------
# LSTM


def lstm_forward(x, h0, c0, params):
    """LSTM over a batch of sequences; gates i, f, g, o in PyTorch's order.

        [i, f, g, o] = x_t W_x + h_{t-1} W_h + b;  i, f, o = sigmoid, g = tanh
        c_t = f * c_{t-1} + i * g;   h_t = o * tanh(c_t)

    x (B, T, D), h0 and c0 (B, Hd), params {'W_x' (D, 4Hd), 'W_h' (Hd, 4Hd), 'b' (4Hd,)}.
    Returns hs (B, T, Hd), c_T (B, Hd) and cache = {'x', 'h0', 'c0', 'hs', 'cs', 'gates', 'params'}, where
    cs (B, T, Hd) holds every c_t and gates (B, T, 4Hd) the activated i, f, g, o.
    """
    _check_inputs("lstm", x, h0, params, c0)
    xp = get_xp(x)
    B, T, _ = x.shape
    Hd = h0.shape[1]
    x_part = x @ params["W_x"] + params["b"]                   # (B, T, 4Hd)
    hs = xp.empty((B, T, Hd), dtype=x.dtype)
    cs = xp.empty((B, T, Hd), dtype=x.dtype)
    gates = xp.empty((B, T, 4 * Hd), dtype=x.dtype)
    h, c = h0, c0                                              # (B, Hd) each
    for t in range(T):
        a = x_part[:, t] + h @ params["W_h"]                   # (B, 4Hd) pre-activations
        i, f, o = sigmoid(a[:, :Hd]), sigmoid(a[:, Hd:2 * Hd]), sigmoid(a[:, 3 * Hd:])  # (B, Hd) each
        g = xp.tanh(a[:, 2 * Hd:3 * Hd])                       # (B, Hd) candidate cell value
        c = f * c + i * g                                      # (B, Hd)
        h = o * xp.tanh(c)                                     # (B, Hd)
        hs[:, t], cs[:, t] = h, c
        gates[:, t] = xp.concatenate([i, f, g, o], axis=1)
    return hs, c, {"x": x, "h0": h0, "c0": c0, "hs": hs, "cs": cs, "gates": gates, "params": params}


def lstm_backward(dhs, cache, dc_T=None):
    """BPTT for lstm_forward: dx, dh0, dc0, grads {'W_x', 'W_h', 'b'}.

    dhs (B, T, Hd); dc_T (B, Hd), the gradient of the returned c_T, or None for zero.
    The cell path dc_{t-1} = dc_t * f is a product of gates, not of W_h: with f near 1 it neither
    vanishes nor explodes (the "constant error carousel").
    """
    check_cache(cache, "lstm_forward", {"x", "h0", "c0", "hs", "cs", "gates", "params"})
    x, h0, c0, hs, cs, gates, params = (cache[k] for k in ("x", "h0", "c0", "hs", "cs", "gates", "params"))
    check_upstream("dhs", dhs, hs.shape, hs.dtype)
    if dc_T is not None:
        check_upstream("dc_T", dc_T, c0.shape, c0.dtype)
    xp = get_xp(dhs)
    T, Hd = x.shape[1], h0.shape[1]
    da = xp.empty_like(gates)                                  # (B, T, 4Hd) gradient of the pre-activations
    dh_next = xp.zeros_like(h0)                                # (B, Hd)
    dc_next = xp.zeros_like(c0) if dc_T is None else dc_T      # (B, Hd) gradient arriving at c_t from later
    for t in reversed(range(T)):
        i, f, g, o = (gates[:, t, k * Hd:(k + 1) * Hd] for k in range(4))  # (B, Hd) each
        c_prev = cs[:, t - 1] if t > 0 else c0                 # (B, Hd)
        tanh_c = xp.tanh(cs[:, t])                             # (B, Hd)
        dh = dhs[:, t] + dh_next                               # h_t feeds the output and step t+1
        dc = dc_next + dh * o * (1 - tanh_c ** 2)              # c_t feeds h_t = o tanh(c_t) and c_{t+1}
        da[:, t] = xp.concatenate([dc * g * i * (1 - i),       # c_t = f c_{t-1} + i g, then i = sigmoid(a_i)
                                   dc * c_prev * f * (1 - f),  # f = sigmoid(a_f)
                                   dc * i * (1 - g ** 2),      # g = tanh(a_g)
                                   dh * tanh_c * o * (1 - o)], axis=1)  # o = sigmoid(a_o)
        dc_next = dc * f                                       # c_t = f * c_{t-1} + ...
        dh_next = da[:, t] @ params["W_h"].T                   # a = ... + h_{t-1} W_h
    grads = {"W_x": matmul_over_time(x, da),                  # (D, 4Hd)
             "W_h": matmul_over_time(_previous_states(h0, hs), da),  # (Hd, 4Hd)
             "b": da.sum(axis=(0, 1))}                         # (4Hd,)
    return da @ params["W_x"].T, dh_next, dc_next, grads      # dx, dh0, dc0


# ----------------------------------------------------------------------------------------------------
# GRU


def gru_forward(x, h0, params):
    """GRU over a batch of sequences; gates r, z, n in PyTorch's order.

        r = sigmoid(x_t W_xr + b_xr + h W_hr + b_hr),   z = sigmoid(x_t W_xz + b_xz + h W_hz + b_hz)
        n = tanh(x_t W_xn + b_xn + r * (h W_hn + b_hn)),   h_t = (1 - z) * n + z * h_{t-1}

    x (B, T, D), h0 (B, Hd), params {'W_x' (D, 3Hd), 'W_h' (Hd, 3Hd), 'b_x' (3Hd,), 'b_h' (3Hd,)}.
    Returns hs (B, T, Hd) and cache = {'x', 'h0', 'hs', 'gates', 'h_ns', 'params'}: gates (B, T, 3Hd) are
    the activated r, z, n and h_ns (B, T, Hd) the terms h_{t-1} W_hn + b_hn that r multiplies.
    """
    _check_inputs("gru", x, h0, params)
    xp = get_xp(x)
    B, T, _ = x.shape
    Hd = h0.shape[1]
    x_part = x @ params["W_x"] + params["b_x"]                 # (B, T, 3Hd)
    hs = xp.empty((B, T, Hd), dtype=x.dtype)
    gates = xp.empty((B, T, 3 * Hd), dtype=x.dtype)
    h_ns = xp.empty((B, T, Hd), dtype=x.dtype)
    h = h0
    for t in range(T):
        h_part = h @ params["W_h"] + params["b_h"]             # (B, 3Hd)
        r = sigmoid(x_part[:, t, :Hd] + h_part[:, :Hd])        # (B, Hd) reset gate
        z = sigmoid(x_part[:, t, Hd:2 * Hd] + h_part[:, Hd:2 * Hd])  # (B, Hd) update gate
        n = xp.tanh(x_part[:, t, 2 * Hd:] + r * h_part[:, 2 * Hd:])  # (B, Hd) candidate state
        h = (1 - z) * n + z * h                                # (B, Hd)
        hs[:, t], h_ns[:, t] = h, h_part[:, 2 * Hd:]
        gates[:, t] = xp.concatenate([r, z, n], axis=1)
    return hs, {"x": x, "h0": h0, "hs": hs, "gates": gates, "h_ns": h_ns, "params": params}


def gru_backward(dhs, cache):
    """BPTT for gru_forward: dx, dh0, grads {'W_x', 'W_h', 'b_x', 'b_h'}, given dhs (B, T, Hd).

    The x-side and h-side pre-activations get the same gradient for r and z; for n the h side gets it
    multiplied by r, since n = tanh(x-part + r * h-part).
    """
    check_cache(cache, "gru_forward", {"x", "h0", "hs", "gates", "h_ns", "params"})
    x, h0, hs, gates, h_ns, params = (cache[k] for k in ("x", "h0", "hs", "gates", "h_ns", "params"))
    check_upstream("dhs", dhs, hs.shape, hs.dtype)
    xp = get_xp(dhs)
    T, Hd = x.shape[1], h0.shape[1]
    h_prevs = _previous_states(h0, hs)                         # (B, T, Hd)
    da_x = xp.empty_like(gates)                                # (B, T, 3Hd) gradient of x W_x + b_x
    da_h = xp.empty_like(gates)                                # (B, T, 3Hd) gradient of h W_h + b_h
    dh_next = xp.zeros_like(h0)                                # (B, Hd)
    for t in reversed(range(T)):
        r, z, n = (gates[:, t, k * Hd:(k + 1) * Hd] for k in range(3))  # (B, Hd) each
        dh = dhs[:, t] + dh_next                               # h_t feeds the output and step t+1
        dn_pre = dh * (1 - z) * (1 - n ** 2)                   # h_t = (1 - z) n + z h_{t-1}, n = tanh(.)
        dz_pre = dh * (h_prevs[:, t] - n) * z * (1 - z)        # z = sigmoid(.)
        dr_pre = dn_pre * h_ns[:, t] * r * (1 - r)             # n = tanh(... + r * h_n), r = sigmoid(.)
        da_x[:, t] = xp.concatenate([dr_pre, dz_pre, dn_pre], axis=1)
        da_h[:, t] = xp.concatenate([dr_pre, dz_pre, dn_pre * r], axis=1)
        dh_next = dh * z + da_h[:, t] @ params["W_h"].T        # h_{t-1} reaches h_t directly and via W_h
    grads = {"W_x": matmul_over_time(x, da_x), "W_h": matmul_over_time(h_prevs, da_h),
             "b_x": da_x.sum(axis=(0, 1)), "b_h": da_h.sum(axis=(0, 1))}
    return da_x @ params["W_x"].T, dh_next, grads             # dx, dh0


# ----------------------------------------------------------------------------------------------------
# One interface for the three cells: the state is a tuple, (h,) for 'rnn' and 'gru', (h, c) for 'lstm'


def init_cell(cell, D, Hd, rng, dtype=np.float32):
    """Parameters of cell 'rnn', 'lstm' or 'gru' (see init_rnn, init_lstm, init_gru)."""
    return {"rnn": init_rnn, "lstm": init_lstm, "gru": init_gru}[_check_cell(cell)](D, Hd, rng, dtype)


def param_shapes(cell, D, Hd):
    """{key: shape} of cell's parameters for input width D and hidden width Hd (what init_cell builds)."""
    return {"rnn": {"W_xh": (D, Hd), "W_hh": (Hd, Hd), "b_h": (Hd,)},
            "lstm": {"W_x": (D, 4 * Hd), "W_h": (Hd, 4 * Hd), "b": (4 * Hd,)},
            "gru": {"W_x": (D, 3 * Hd), "W_h": (Hd, 3 * Hd), "b_x": (3 * Hd,), "b_h": (3 * Hd,)}}[_check_cell(cell)]


def zero_state(cell, B, Hd, xp=np, dtype=np.float32):
    """The all-zero initial state tuple for a batch of B sequences: (h0,), or (h0, c0) for the LSTM."""
    check_positive_int("B", B, minimum=0)                      # an empty batch is allowed, as everywhere
    check_positive_int("Hd", Hd)
    return tuple(xp.zeros((B, Hd), dtype=dtype) for _ in range(2 if _check_cell(cell) == "lstm" else 1))


def cell_forward(x, state, params, cell):
    """Run cell ('rnn', 'lstm' or 'gru') over x (B, T, D) from `state`. Returns hs (B, T, Hd), the final
    state tuple and cache = {'cell': cell, 'steps': the cache of rnn_forward, lstm_forward or gru_forward}."""
    _check_state(cell, state)
    if cell == "lstm":
        hs, c_T, steps = lstm_forward(x, state[0], state[1], params)
        return hs, (hs[:, -1], c_T), {"cell": cell, "steps": steps}
    hs, steps = {"rnn": rnn_forward, "gru": gru_forward}[cell](x, state[0], params)
    return hs, (hs[:, -1],), {"cell": cell, "steps": steps}


def cell_backward(dhs, cache, dstate=None):
    """dx, dstate0 (a tuple like the state), grads of cell_forward.

    dstate: gradient of the final state tuple, or None. The final h is hs[:, -1], so its gradient
    joins dhs[:, -1] (one array used twice: the gradients add).
    """
    check_cache(cache, "cell_forward", {"cell", "steps"})
    cell, steps = cache["cell"], cache["steps"]
    if dstate is not None:
        _check_state(cell, dstate, "dstate")
        hs = steps["hs"]                                       # (B, T, Hd)
        check_upstream("dhs", dhs, hs.shape, hs.dtype)
        check_upstream("dstate[0]", dstate[0], hs[:, -1].shape, hs.dtype)
        dhs = dhs.copy()                                       # never modify the caller's array
        dhs[:, -1] += dstate[0]
    if cell == "lstm":
        dx, dh0, dc0, grads = lstm_backward(dhs, steps, None if dstate is None else dstate[1])
        return dx, (dh0, dc0), grads
    dx, dh0, grads = {"rnn": rnn_backward, "gru": gru_backward}[cell](dhs, steps)
    return dx, (dh0,), grads


# ----------------------------------------------------------------------------------------------------
# The measurement: how much of d h_T reaches h_t


def hidden_jacobian_norms(x, params, cell):
    """norms[k] = ||d h_T / d h_{T-k}||_2 for k = 0..T, for one sequence x (T, D) from a zero state.

    The Jacobian J_k (Hd, Hd) is a chain of one-step Jacobians. For the tanh RNN each step is
    d h_t / d h_{t-1} = W_hh diag(1 - h_t^2) (row layout), and |tanh'| <= 1, so
    ||J_k||_2 <= ||W_hh||_2^k: with spectral norm below 1 the gradient vanishes at least geometrically.
    For the LSTM it is d h_T / d h_{T-k} with c_{T-k} held fixed (the cell path is carried alongside).
    Computed by backward itself on Hd copies of the sequence: copy a starts by sending e_a back from h_T,
    and after k single steps backwards it holds row a of J_k, d h_T[a] / d h_{T-k}.
    """
    _check_cell(cell)
    if not hasattr(x, "dtype") or x.dtype.kind != "f":
        raise TypeError(f"x must be a floating-point array, got {describe(x)}")
    if x.ndim != 2:
        raise ValueError(f"x must have shape (T, D), got {x.shape}")
    key = "W_hh" if cell == "rnn" else "W_h"                    # Hd comes from here; cell_forward checks the rest
    if not hasattr(params.get(key) if isinstance(params, dict) else None, "shape"):
        got = f"keys {sorted(map(str, params))}" if isinstance(params, dict) else describe(params)
        raise ValueError(f"params must be {cell!r} parameters (with {key!r}), got {got}")
    xp = get_xp(x)
    T, D = x.shape
    Hd = params[key].shape[0]
    states = [zero_state(cell, B=Hd, Hd=Hd, xp=xp, dtype=x.dtype)]  # states[t]: after t steps; a batch of Hd copies
    caches = []
    for t in range(T):
        x_t = xp.broadcast_to(x[t], (Hd, 1, D))                # (Hd, 1, D) step t in every copy
        _, state, cache = cell_forward(x_t, states[-1], params, cell)
        states.append(state)
        caches.append(cache)
    eye = xp.eye(Hd, dtype=x.dtype)                            # (Hd, Hd) copy a sends back e_a
    dstate = (eye,) + tuple(xp.zeros_like(eye) for _ in states[0][1:])  # d h_T / d (h_T, c_T)
    no_output_gradient = xp.zeros((Hd, 1, Hd), dtype=x.dtype)  # only h_T is differentiated
    norms = [1.0]                                              # k = 0: d h_T / d h_T = I
    for t in reversed(range(T)):                               # step t took states[t] to states[t + 1]
        _, dstate, _ = cell_backward(no_output_gradient, caches[t], dstate)
        norms.append(float(xp.linalg.svd(dstate[0], compute_uv=False)[0]))  # dstate[0] = J_{T-t}
    return np.array(norms)


def gradient_norm_curves(T=60, D=32, Hd=32, spectral_norms=(0.9, 6.0), seed=0):
    """The demo's measurement (and the README's figure): hidden_jacobian_norms over one random sequence
    x (T, D) for a tanh RNN whose W_hh is rescaled to each spectral norm in spectral_norms, an LSTM with
    PyTorch's init, the same with forget bias +3, and a GRU. Returns {label: norms (T + 1,)}, float64."""
    check_positive_int("T", T)
    check_positive_int("D", D)
    check_positive_int("Hd", Hd)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D))                            # (T, D) one random input sequence
    base = init_rnn(D, Hd, rng, np.float64)
    spectral = float(np.linalg.norm(base["W_hh"], 2))
    curves = {f"tanh RNN, ||W_hh||_2 = {target}": hidden_jacobian_norms(
        x, dict(base, W_hh=base["W_hh"] * (target / spectral)), "rnn") for target in spectral_norms}
    curves["LSTM, PyTorch init"] = hidden_jacobian_norms(x, init_lstm(D, Hd, rng, np.float64), "lstm")
    curves["LSTM, forget bias +3"] = hidden_jacobian_norms(x, init_lstm(D, Hd, rng, np.float64, 3.0), "lstm")
    curves["GRU, PyTorch init"] = hidden_jacobian_norms(x, init_gru(D, Hd, rng, np.float64), "gru")
    return curves


# ----------------------------------------------------------------------------------------------------
# A character-level language model: embedding -> recurrent core -> softmax over the next character


# The grammar of grammar_text: one phrase from each slot, in this order (6 * 6 * 6 * 4 = 864 sentences).
# experiments/three_shapes.py parses and transforms its sentences with these lists.
GRAMMAR = {"subject": ("the cat", "a dog", "the old man", "my sister", "a small bird", "the teacher"),
           "verb": ("sees", "likes", "chases", "finds", "draws", "hears"),
           "object": ("the ball", "a red fish", "the moon", "her friend", "a green tree", "the little boat"),
           "ending": (".", " today.", " again.", " at night.")}


def grammar_text(rng, n_sentences):
    """Training text made here from a tiny grammar (no downloads): sentence = subject verb object end."""
    check_rng(rng)
    check_positive_int("n_sentences", n_sentences)
    pick = lambda slot: GRAMMAR[slot][rng.integers(len(GRAMMAR[slot]))]
    sentence = lambda: f"{pick('subject')} {pick('verb')} {pick('object')}{pick('ending')}"
    return " ".join(sentence() for _ in range(n_sentences))


def init_char_lm(V, E, Hd, rng, cell="lstm", dtype=np.float32):
    """{'embed' (V, E), 'core': <cell params>, 'W_out' (Hd, V), 'b_out' (V,)}."""
    check_positive_int("V", V)
    check_positive_int("E", E)
    _check_init(E, Hd, rng, dtype)
    _check_cell(cell)
    return {"embed": (0.1 * rng.standard_normal((V, E))).astype(dtype),
            "core": init_cell(cell, E, Hd, rng, dtype),
            "W_out": _uniform(rng, (Hd, V), Hd, dtype), "b_out": np.zeros(V, dtype=dtype)}


def char_lm_forward(ids, targets, params, cell="lstm"):
    """Mean cross-entropy of predicting targets[b, t] (the next character) from ids[b, :t+1].

    ids, targets: int (B, T). From a zero state:
        x = embed[ids],  hs = core(x),  logits = hs W_out + b_out,  loss = -mean log softmax(logits)[targets]
    Returns loss (a float) and cache = {'embed': embedding cache, 'core': cell_forward's cache, 'hs' (B, T, Hd),
    'loss': cross-entropy cache (its 'probs' (B, T, V) is softmax(logits)), 'params'}.
    """
    V = _check_char_lm(params, cell)
    check_ids("ids", ids, V)
    check_ids("targets", targets, V, ids.shape)
    x, embed_cache = embedding_forward(ids, params["embed"])   # (B, T, E)
    xp = get_xp(x)
    state = zero_state(cell, ids.shape[0], params["W_out"].shape[0], xp, x.dtype)
    hs, _, core_cache = cell_forward(x, state, params["core"], cell)  # (B, T, Hd)
    loss, loss_cache = cross_entropy_forward(hs @ params["W_out"] + params["b_out"], targets)
    return loss, {"embed": embed_cache, "core": core_cache, "hs": hs, "loss": loss_cache, "params": params}


def char_lm_backward(dloss, cache):
    """Gradient tree of char_lm_forward's loss with respect to params (same keys)."""
    check_cache(cache, "char_lm_forward", {"embed", "core", "hs", "loss", "params"})
    params, hs = cache["params"], cache["hs"]
    dlogits = cross_entropy_backward(dloss, cache["loss"])     # (B, T, V)
    dhs = dlogits @ params["W_out"].T                          # (B, T, Hd)
    dx, _, dcore = cell_backward(dhs, cache["core"])           # (B, T, E)
    return {"embed": embedding_backward(dx, cache["embed"]),  # (V, E)
            "core": dcore,
            "W_out": matmul_over_time(hs, dlogits),           # (Hd, V)
            "b_out": dlogits.sum(axis=(0, 1))}                 # (V,)


def sample_chars(first_id, n_new, params, cell="lstm", temperature=0.0, rng=None):
    """n_new character ids after first_id, each fed back as the next input (the state carries over).

    Like transformer.py's generate: temperature 0 takes the most likely id (greedy, no rng needed);
    temperature > 0 draws it from softmax(logits / temperature) with rng, a numpy.random.Generator.
    """
    V = _check_char_lm(params, cell)
    check_positive_int("first_id", first_id, minimum=0)
    if first_id >= V:
        raise ValueError(f"first_id must be in [0, {V}), got {first_id}")
    check_positive_int("n_new", n_new, minimum=0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature < np.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if temperature > 0:
        check_rng(rng)
    xp = get_xp(params["embed"])
    state = zero_state(cell, 1, params["W_out"].shape[0], xp, params["embed"].dtype)
    ids = [first_id]
    for _ in range(n_new):
        x = params["embed"][ids[-1]][None, None]               # (1, 1, E)
        hs, state, _ = cell_forward(x, state, params["core"], cell)
        logits = hs[0, -1] @ params["W_out"] + params["b_out"]  # (V,)
        if temperature == 0:
            ids.append(int(logits.argmax()))
            continue
        probs = xp.exp(log_softmax(logits / temperature))      # (V,)
        below = xp.cumsum(probs) < rng.random()                # inverse CDF: count entries below u
        ids.append(min(int(below.sum()), V - 1))
    return ids[1:]


# ----------------------------------------------------------------------------------------------------
# Input checks (below the math they guard): ValueError / TypeError "{name} must be {need}, got {got}"


def _check_cell(cell):
    if cell not in ("rnn", "lstm", "gru"):
        raise ValueError(f"cell must be 'rnn', 'lstm' or 'gru', got {cell!r}")
    return cell


def _check_init(D, Hd, rng, dtype):
    """The arguments every init_* takes: D >= 0 (an empty input is allowed), Hd >= 1, a Generator, a float dtype."""
    check_positive_int("D", D, minimum=0)
    check_positive_int("Hd", Hd)
    check_rng(rng)
    if not isinstance(dtype, (type, np.dtype)) or np.dtype(dtype).kind != "f":
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype!r}")


def _check_state(cell, state, name="state"):
    """A state (or its gradient) is a tuple: (h,) for 'rnn' and 'gru', (h, c) for 'lstm'."""
    n = 2 if _check_cell(cell) == "lstm" else 1
    if not isinstance(state, (tuple, list)) or len(state) != n:
        got = f"length {len(state)}" if isinstance(state, (tuple, list)) else type(state).__name__
        raise ValueError(f"{name} must be a tuple of {n} arrays for {cell!r} ({'(h, c)' if n == 2 else '(h,)'}), "
                         f"got {got}")


def _check_inputs(cell, x, h0, params, c0=False):
    """The arguments of rnn_forward, lstm_forward (with c0) and gru_forward: D comes from x, Hd from h0,
    and params must be that cell's tree for them, in x's dtype. c0 is False for the cells without one."""
    arrays = [("x", x), ("h0", h0)] + ([("c0", c0)] if c0 is not False else [])
    for name, a in arrays:
        if not hasattr(a, "dtype") or a.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got {describe(a)}")
    for name, a in arrays[1:]:
        if a.dtype != x.dtype:
            raise TypeError(f"{name} must have dtype {x.dtype} (x's), got {a.dtype}")
    if x.ndim != 3 or x.shape[1] == 0:
        raise ValueError(f"x must have shape (B, T, D) with T >= 1, got {x.shape}")
    B, _, D = x.shape
    if h0.ndim != 2 or h0.shape[0] != B or h0.shape[1] == 0:
        raise ValueError(f"h0 must have shape (B, Hd) with B = {B} from x and Hd >= 1, got {h0.shape}")
    if c0 is not False and c0.shape != h0.shape:
        raise ValueError(f"c0 must have shape (B, Hd) = {h0.shape} (h0's), got {c0.shape}")
    check_tree("params", params, param_shapes(cell, D, h0.shape[1]), dtype=x.dtype)


def _check_char_lm(params, cell):
    """params must be init_char_lm(V, E, Hd, rng, cell)'s tree (V, E read from embed, Hd from W_out), every
    leaf in embed's dtype; returns V."""
    embed, W_out = (params.get(key) if isinstance(params, dict) else None for key in ("embed", "W_out"))
    if getattr(embed, "ndim", None) != 2 or getattr(W_out, "ndim", None) != 2:
        got = f"keys {sorted(map(str, params))}" if isinstance(params, dict) else type(params).__name__
        raise TypeError(f"params must be init_char_lm's dict ('embed' (V, E), 'core', 'W_out' (Hd, V), "
                        f"'b_out' (V,)), got {got}")
    (V, E), Hd = embed.shape, W_out.shape[0]
    shapes = {"embed": (V, E), "core": param_shapes(cell, E, Hd), "W_out": (Hd, V), "b_out": (V,)}
    check_tree("params", params, shapes, dtype=embed.dtype)
    return V


# ----------------------------------------------------------------------------------------------------
# Demo


if __name__ == "__main__":
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")   # small matrices: a second BLAS thread would only wait (spinning)
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Train a character LSTM; measure ||d h_T / d h_t||.")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the char model")
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    print("1. A character-level LSTM language model on text from a tiny grammar")
    text = grammar_text(rng, 2000)
    chars = sorted(set(text))
    data = np.array([chars.index(c) for c in text])            # (N,) character ids
    freq = np.bincount(data) / len(data)
    unigram = float(-(freq * np.log(freq)).sum())              # the loss of a model that ignores context
    params = init_char_lm(len(chars), 16, 64, rng, "lstm", np.float32)
    optimizer = adam_init(params)
    B, T = 32, 48
    start = time.perf_counter()
    losses = []
    for step in range(args.steps + 1):
        offsets = rng.integers(0, len(data) - T - 1, size=B)
        window = np.stack([data[o:o + T + 1] for o in offsets])  # (B, T + 1): inputs and next characters
        loss, cache = char_lm_forward(window[:, :-1], window[:, 1:], params, "lstm")
        grads, norm = clip_gradients(char_lm_backward(1.0, cache), max_norm=5.0)
        params, optimizer = adam_step(params, grads, optimizer, lr=1e-2)
        losses.append(loss)
        if step % 50 == 0:
            print(f"   step {step:4d}  loss {loss:.3f} nats/char  gradient norm {norm:.2f}")
    print(f"   {len(text)} characters, {len(chars)} distinct; a context-free (unigram) model scores "
          f"{unigram:.3f}; trained in {time.perf_counter() - start:.1f} s")
    ids = sample_chars(chars.index("."), 160, params, "lstm", temperature=0.5, rng=rng)
    print("   sample:", "".join(chars[i] for i in ids))
    final = float(np.mean(losses[-20:]))
    assert final < 0.25 * losses[0] and final < 0.5 * unigram, "the char model did not learn"

    print("\n2. How much gradient reaches h_t from h_T: ||d h_T / d h_t||_2 against T - t (Pascanu et al.)")
    T = 60
    curves = gradient_norm_curves(T)
    ks = list(range(0, T + 1, 10))
    print("   T - t:                      " + "".join(f"{k:>10d}" for k in ks))
    for name, norms in curves.items():
        print(f"   {name:28s}" + "".join(f"{norms[k]:10.1e}" for k in ks))
    bound = 0.9 ** np.arange(T + 1)
    assert np.all(curves["tanh RNN, ||W_hh||_2 = 0.9"] <= bound * (1 + 1e-9)), "geometric bound violated"
    assert curves["tanh RNN, ||W_hh||_2 = 6.0"][-1] > 1e3, "large recurrent weights should explode"
    assert curves["LSTM, forget bias +3"][-1] > 1e6 * curves["LSTM, PyTorch init"][-1]
    print("   ||W_hh||_2 < 1: below ||W_hh||_2^(T-t) (vanishes); large W_hh: explodes; the LSTM's cell")
    print("   keeps the gradient alive only when its forget gate is open (f near 1): a positive forget bias.")
    print("   (python figures/make_figures.py rnn_gradient_norms draws these curves.)")
