"""The tools every model here trains with: params trees, the loss, the embedding, clipping, AdamW, the schedule.

A model in this project is a params tree (nested dicts and lists of arrays) with a forward that returns a
loss and a backward that returns a grads tree of the same shape. Training is then the same few lines for an
RNN, a transformer or a ViT: clip the gradient, take an optimizer step, move the learning rate along its
schedule. Those steps, and the two layers every token model starts and ends with, live here:

    embedding:      x = table[ids]                                  dtable[v] = sum of dx at positions with ids = v
    log-softmax:    logp = z - max(z) - log sum_v exp(z_v - max(z))  over the last axis
    cross-entropy:  loss_i = (1 - eps) * (-logp_i[t_i]) + eps * mean_v(-logp_i[v])   (eps: label smoothing)
                    loss = mean of loss_i over the positions i whose target is not ignore_index
                    dlogits_i = (softmax(z_i) - (1 - eps) * onehot(t_i) - eps / V) / N   (0 at ignored i)
    clipping:       g <- g * min(1, max_norm / ||g||), ||g|| the L2 norm of all leaves together
    AdamW:          p <- p - lr * wd * p                             (decoupled weight decay, leaves that decay)
                    m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
                    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    schedule:       lr = max_lr * step / warmup                      for step < warmup
                    lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2,
                         progress = (step - warmup) / (total - warmup), then min_lr from step = total on

Papers: Adam, Kingma & Ba 2014 (arXiv:1412.6980); AdamW, Loshchilov & Hutter 2017 (arXiv:1711.05101);
clipping, Pascanu et al. 2012 (arXiv:1211.5063); label smoothing, Szegedy et al. 2015 (arXiv:1512.00567);
warm-up and cosine decay, Loshchilov & Hutter 2016 (arXiv:1608.03983), Goyal et al. 2017 (arXiv:1706.02677).
Cross-entropy equals torch.nn.functional.cross_entropy (its ignore_index and label_smoothing included) and
adam_step equals torch.optim.AdamW step for step; tests/test_training.py checks both where torch is installed.

The input checks every model file shares live here too (check_ids, check_upstream, check_cache, check_tree,
check_rng, check_positive_int, describe): bad input raises ValueError or TypeError worded
"{name} must be {need}, got {got}".

Shapes: B batch, T time steps (tokens), V vocabulary, E embedding width.
Imports no project file, so a student copying a model file takes this one along, never another model's
file. Runs on NumPy or CuPy arrays unchanged.
"""
import math
import sys

import numpy as np


def get_xp(*arrays):
    """The array module of the inputs: cupy for CuPy arrays, numpy otherwise.

    attention.py, positional.py, training.py and erf.py each define this helper: they import no project file.
    """
    cupy = sys.modules.get("cupy")  # no CuPy array exists unless cupy was imported; a failed import costs ~50 us
    return np if cupy is None else cupy.get_array_module(*arrays)


# ----------------------------------------------------------------------------------------------------
# Params trees: nested dicts and lists of arrays, walked leaf by leaf


def tree_map(fn, *trees):
    """fn applied leaf by leaf to trees of the same structure (nested dicts / lists / tuples of arrays).

    The first tree gives the structure; the others must have the same keys and lengths (ValueError).
    Example: tree_map(lambda p, g: p - lr * g, params, grads) is plain gradient descent.
    """
    first = trees[0]
    if isinstance(first, dict):
        for tree in trees[1:]:
            if not isinstance(tree, dict) or set(tree) != set(first):
                got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
                raise ValueError(f"trees must have the same structure: keys {sorted(first)}, got {got}")
        return {key: tree_map(fn, *(tree[key] for tree in trees)) for key in first}
    if isinstance(first, (list, tuple)):
        for tree in trees[1:]:
            if not isinstance(tree, (list, tuple)) or len(tree) != len(first):
                got = f"length {len(tree)}" if isinstance(tree, (list, tuple)) else type(tree).__name__
                raise ValueError(f"trees must have the same structure: a list of length {len(first)}, got {got}")
        return type(first)(tree_map(fn, *items) for items in zip(*trees))
    return fn(*trees)


def tree_leaves(tree):
    """The arrays of a tree in a fixed order (dict keys sorted), so that two trees' leaves line up."""
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in tree_leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in tree_leaves(item)]
    return [tree]


# ----------------------------------------------------------------------------------------------------
# The token embedding (the first layer of a language model)


def embedding_forward(ids, table):
    """x = table[ids]: row ids[b, t] of the table for every token.

    ids int (B, T) with values in [0, V), table (V, E). Equal to one_hot(ids) @ table, without the one-hots.
    Returns x (B, T, E) and cache = {'ids': ids, 'table_shape': (V, E), 'dtype': table's dtype}.
    """
    if not hasattr(table, "dtype") or table.dtype.kind != "f" or table.ndim != 2 or table.shape[0] == 0:
        raise TypeError(f"table must be a floating-point array (V, E) with V >= 1, got {describe(table)}")
    check_ids("ids", ids, table.shape[0])
    x = table[ids]                                             # (B, T, E)
    return x, {"ids": ids, "table_shape": table.shape, "dtype": table.dtype}


def embedding_backward(dx, cache):
    """dtable (V, E): dtable[v] = sum of dx[b, t] over the positions where ids[b, t] = v.

    A row used at several positions sums their gradients (one array used twice). xp.add.at is a
    scatter-add that accumulates repeated indices (plain dtable[ids] += dx would keep only one of them),
    and costs O(B T E) where the one-hot form one_hot(ids)^T dx costs O(B T V) memory and O(B T V E) work.
    """
    check_cache(cache, "embedding_forward", {"ids", "table_shape", "dtype"})
    ids = cache["ids"]
    check_upstream("dx", dx, ids.shape + cache["table_shape"][1:], cache["dtype"])
    xp = get_xp(dx)
    dtable = xp.zeros(cache["table_shape"], dtype=dx.dtype)   # (V, E)
    xp.add.at(dtable, ids, dx)                                 # dtable[ids[b, t]] += dx[b, t], repeats summed
    return dtable


# ----------------------------------------------------------------------------------------------------
# Log-softmax and cross-entropy (the last layer of a classifier or language model)


def log_softmax(logits):
    """logp = z - max(z) - log(sum exp(z - max(z))) over the last axis.

    Subtracting the row max changes nothing mathematically but keeps exp() from overflowing.
    """
    xp = get_xp(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)      # (..., V) largest entry is 0
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy_forward(logits, targets, ignore_index=-100, label_smoothing=0.0):
    """Mean cross-entropy of logits against integer targets: torch.nn.functional.cross_entropy.

        loss_i = (1 - eps) * (-logp_i[t_i]) + eps * mean_v(-logp_i[v]),   logp_i = log_softmax(logits_i)
        loss = sum of loss_i over kept positions / N,   N = number of positions with t_i != ignore_index

    Label smoothing (eps = label_smoothing) is PyTorch's: the target distribution gives eps / V to every
    class, the target included, and 1 - eps on top to the target (not the eps / (V - 1) of some other
    implementations). Positions whose target is ignore_index (padding) add nothing and are not counted in N.
    If every position is ignored, the loss is 0 and the gradient zero (PyTorch returns nan): a batch with
    nothing to score teaches nothing.

    logits (..., V) float, targets int (...), each in [0, V) or equal to ignore_index.
    Returns loss (a Python float) and cache = {'probs' (..., V) softmax(logits), 'targets' (...) with
    ignored positions set to 0, 'keep' (...) bool, 'count' N, 'label_smoothing' eps}.
    """
    _check_cross_entropy_inputs(logits, targets, ignore_index, label_smoothing)
    xp = get_xp(logits)
    keep = targets != ignore_index                             # (...) positions that count
    count = int(keep.sum())                                    # N
    safe = xp.where(keep, targets, 0)                          # (...) ignored positions read class 0, then drop
    logp = log_softmax(logits)                                 # (..., V)
    nll = -xp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]  # (...) -logp[t]
    per_position = (1 - label_smoothing) * nll                 # (...)
    if label_smoothing:
        per_position = per_position - label_smoothing * logp.mean(axis=-1)  # + eps * mean_v(-logp[v])
    total = float(xp.where(keep, per_position, 0).sum())
    loss = total / count if count else 0.0
    cache = {"probs": xp.exp(logp), "targets": safe, "keep": keep, "count": count,
             "label_smoothing": label_smoothing}
    return loss, cache


def cross_entropy_backward(dloss, cache):
    """dlogits (..., V) = dloss * (softmax(logits) - (1 - eps) * onehot(t) - eps / V) / N, 0 where ignored.

    Softmax and cross-entropy differentiated together: d(-logp[t]) / dz = softmax(z) - onehot(t), and
    d mean_v(-logp[v]) / dz = softmax(z) - 1 / V. dloss is the gradient of whatever the loss fed (1.0 when
    the loss is what is minimised). The one-hot is never built: (1 - eps) is subtracted at each target entry.
    """
    check_cache(cache, "cross_entropy_forward", {"probs", "targets", "keep", "count", "label_smoothing"})
    if hasattr(dloss, "shape"):
        if dloss.shape != ():
            raise ValueError(f"dloss must be a scalar, got shape {dloss.shape}")
    elif not isinstance(dloss, (int, float)) or isinstance(dloss, bool):
        raise TypeError(f"dloss must be a real number, got {dloss!r}")
    probs, targets, eps = cache["probs"], cache["targets"], cache["label_smoothing"]
    xp = get_xp(probs)
    V = probs.shape[-1]
    if cache["count"] == 0:
        return xp.zeros_like(probs)                            # every position ignored: loss 0, gradient 0
    rows = (probs - eps / V).reshape(-1, V)                    # (positions, V) softmax - eps / V
    rows[xp.arange(rows.shape[0]), targets.reshape(-1)] -= 1 - eps  # - (1 - eps) * onehot(t), entry by entry
    weight = cache["keep"].astype(probs.dtype) * (float(dloss) / cache["count"])  # (...) 0 where ignored
    return rows.reshape(probs.shape) * weight[..., None]       # (..., V)


# ----------------------------------------------------------------------------------------------------
# Gradient clipping, AdamW and the learning-rate schedule


def clip_gradients(grads, max_norm):
    """Rescale the whole gradient tree so its global L2 norm is at most max_norm (Pascanu et al. 2012).

        norm = sqrt(sum over leaves of sum g^2);   g <- g * min(1, max_norm / norm)

    Returns (clipped grads, the norm before clipping); grads is not modified. The training loop calls this
    between backward and the optimizer, so backward always returns true gradients. Same as
    torch.nn.utils.clip_grad_norm_, except that torch divides by norm + 1e-6 (to survive norm = 0, handled
    here directly), so the two differ by a relative 1e-6 / norm when clipping.
    """
    _check_number("max_norm", max_norm, "a positive number")
    _check_float_leaves("grads", grads)
    norm = sum(float((g * g).sum()) for g in tree_leaves(grads)) ** 0.5
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return tree_map(lambda g: g * g.dtype.type(scale), grads), norm


def weight_decay_mask(params):
    """Which leaves weight decay shrinks: True for matrices and tables (ndim >= 2), False for vectors.

    Decay pulls weights that multiply inputs (W, embedding tables) towards zero, a prior that keeps them
    small. Biases and LayerNorm's gamma and beta (ndim 1) set offsets and scales; shrinking gamma towards 0
    would fight the normalisation itself, so they are left alone, as in nanoGPT and most recipes since.
    (minGPT decayed LayerNorm weights by mistake, its issue 23.) Pass the result as adam_step's decay.
    """
    _check_float_leaves("params", params)
    return tree_map(lambda p: p.ndim >= 2, params)


def adam_init(params):
    """Adam's state: first and second moments m, v (trees of zeros shaped like params), step count t = 0."""
    _check_float_leaves("params", params)
    zeros = lambda p: get_xp(p).zeros_like(p)                 # not p * 0, which would carry a NaN or inf along
    return {"m": tree_map(zeros, params), "v": tree_map(zeros, params), "t": 0}


def adam_step(params, grads, state, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decay=None):
    """One step of Adam (Kingma & Ba 2014) with decoupled weight decay (AdamW, Loshchilov & Hutter 2017).

        p <- p * (1 - lr * weight_decay)                 only for leaves whose decay entry is True
        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2;   t <- t + 1
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Dividing by 1 - beta^t corrects the moments' zero start, so the first step moves each p by about
    lr * sign(g). Decay is decoupled: it shrinks p directly instead of adding wd * p to g, where Adam's
    normalisation would undo it. The order and the grouping of the operations are torch.optim.AdamW's
    (single-tensor version), so the two agree step for step; weight_decay = 0 is torch.optim.Adam.
    decay: a tree of bools mirroring params (weight_decay_mask(params) is the usual choice); None decays
    every leaf, as torch does for a single parameter group.
    Returns new (params, state); nothing is modified. float32 params stay float32. Adam trains floats: an
    integer or bool leaf in params is refused, and so are grads, state['m'], state['v'] or decay that do not
    mirror params (named by the path of the first leaf that differs).
    """
    _check_adam_inputs(params, grads, state, decay, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay)
    decay = tree_map(lambda p: True, params) if decay is None else decay
    t = state["t"] + 1
    correct1, correct2 = 1 - beta1 ** t, 1 - beta2 ** t       # m_hat = m / correct1, v_hat = v / correct2
    step_size, sqrt_correct2 = lr / correct1, correct2 ** 0.5
    shrink = 1 - lr * weight_decay
    params = tree_map(lambda p, d: p * shrink if d and weight_decay else p, params, decay)  # decay first
    m = tree_map(lambda m, g: m + (1 - beta1) * (g - m), state["m"], grads)  # beta1 m + (1 - beta1) g, as lerp_
    v = tree_map(lambda v, g: v * beta2 + (1 - beta2) * g * g, state["v"], grads)
    update = lambda p, m, v: p - step_size * m / (get_xp(v).sqrt(v) / sqrt_correct2 + eps)  # sqrt(v_hat) + eps
    return tree_map(update, params, m, v), {"m": m, "v": v, "t": t}


def lr_schedule(step, max_lr, warmup_steps, total_steps, min_lr=0.0):
    """The learning rate at `step`: linear warm-up, then cosine decay, then constant.

        step < warmup_steps:            lr = max_lr * step / warmup_steps        (0 at step 0)
        warmup_steps <= step < total:   lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2,
                                        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        step >= total_steps:            lr = min_lr

    Warm-up keeps the first updates small while Adam's second-moment estimate is still noisy (post-LN
    transformers diverge without it); the cosine brings lr down smoothly for the end of training.
    A loop counting steps from 0 takes its first step at lr 0; pass step + 1 to avoid that.
    step and warmup_steps are integers >= 0, total_steps an integer >= max(1, warmup_steps).
    """
    check_positive_int("step", step, minimum=0)
    check_positive_int("warmup_steps", warmup_steps, minimum=0)
    check_positive_int("total_steps", total_steps)             # a schedule of 0 steps trains nothing
    if total_steps < warmup_steps:
        raise ValueError(f"total_steps must be >= warmup_steps = {warmup_steps}, got {total_steps}")
    _check_number("max_lr", max_lr, "a finite number >= 0")
    _check_number("min_lr", min_lr, "a finite number >= 0")
    if not min_lr <= max_lr:
        raise ValueError(f"min_lr must be in [0, max_lr = {max_lr}], got {min_lr}")
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return float(min_lr)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)   # in [0, 1)
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------
# Input checks (below the math they guard)


def check_ids(name, ids, V, shape=None):
    """Raise TypeError/ValueError unless ids is an integer (B, T) array (of `shape`) with values in [0, V)."""
    if not hasattr(ids, "dtype") or ids.dtype.kind not in "iu":
        got = getattr(ids, "dtype", type(ids).__name__)
        raise TypeError(f"{name} must be an integer array of token ids, got {got}")
    if ids.ndim != 2 or (shape is not None and ids.shape != shape):
        need = "(B, T)" if shape is None else f"(B, T) = {shape}"
        raise ValueError(f"{name} must have shape {need}, got {ids.shape}")
    low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
    if low < 0 or high >= V:
        raise ValueError(f"{name} must hold ids in [0, {V}), got values in [{low}, {high}]")


def check_upstream(name, d, shape, dtype):
    """Raise unless the upstream gradient d is an array of exactly the forward output's shape and dtype.

    Every backward calls this first: a wrong shape would otherwise broadcast silently or sum an axis away,
    and another dtype would turn float32 gradients into float64 ones.
    """
    if not hasattr(d, "dtype"):
        raise TypeError(f"{name} must be an array of dtype {dtype}, got {type(d).__name__}")
    if d.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the forward's), got {d.dtype}")
    if tuple(d.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (the forward output's), got {tuple(d.shape)}")


def check_cache(cache, forward, keys):
    """Raise TypeError unless cache is the dict `forward` returns (exactly these keys): a backward given
    another function's cache, or called the old way with arrays, says so instead of failing inside."""
    if not isinstance(cache, dict) or set(cache) != keys:
        got = f"keys {sorted(cache)}" if isinstance(cache, dict) else type(cache).__name__
        raise TypeError(f"cache must be the dict {forward} returned (keys {sorted(keys)}), got {got}")


def check_tree(name, tree, like, dtype=None):
    """Raise unless `tree` has exactly the structure of `like` (the same dict keys, list lengths) and each
    leaf the shape and dtype of like's leaf: a params tree built for another config, grads or an optimizer
    state from another tree, is refused with the path of the first missing, extra or mis-shaped leaf
    (e.g. params['layers'][1]['ff']['W_1']). `like` may hold shape tuples instead of arrays: then every
    leaf must have `dtype` (any float dtype if None).
    """
    dtype = None if dtype is None else np.dtype(dtype)         # np.float32 would print as <class ...>
    def walk(t, l, path):
        if isinstance(l, dict):
            if not isinstance(t, dict):
                raise TypeError(f"{path} must be a dict with keys {sorted(l)}, got {describe(t)}")
            missing, extra = sorted(set(l) - set(t)), sorted(set(t) - set(l))
            if missing or extra:
                raise ValueError(f"{path} must have keys {sorted(l)}: missing {missing}, extra {extra}")
            for key in l:
                walk(t[key], l[key], f"{path}[{key!r}]")
        elif isinstance(l, list):
            if not isinstance(t, (list, tuple)) or len(t) != len(l):
                got = f"length {len(t)}" if isinstance(t, (list, tuple)) else describe(t)
                raise ValueError(f"{path} must be a list of length {len(l)}, got {got}")
            for i, (a, b) in enumerate(zip(t, l)):
                walk(a, b, f"{path}[{i}]")
        else:
            shape, need_dtype = (l, dtype) if isinstance(l, tuple) else (l.shape, l.dtype)
            if not hasattr(t, "dtype") or t.dtype.kind != "f" or tuple(t.shape) != tuple(shape) \
                    or (need_dtype is not None and t.dtype != need_dtype):
                need = f"a {need_dtype} array" if need_dtype is not None else "a float array"
                need += f" of shape {tuple(shape)}"
                raise ValueError(f"{path} must be {need}, got {describe(t)}")
    walk(tree, like, name)


def check_rng(rng, name="rng"):
    """Raise TypeError unless rng is a numpy.random.Generator (numpy.random.default_rng(seed))."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{name} must be a numpy.random.Generator (numpy.random.default_rng(seed)), "
                        f"got {describe(rng)}")


def check_positive_int(name, value, minimum=1):
    """Raise ValueError unless value is an integer (not a bool) >= minimum: sizes, counts, lengths."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


_RANGES = {                                                    # what a hyperparameter must be -> its test
    "a finite number >= 0": lambda v: 0 <= v < math.inf,
    "a positive finite number": lambda v: 0 < v < math.inf,
    "a positive number": lambda v: v > 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "a number in [0, 1]": lambda v: 0 <= v <= 1,
}


def _check_number(name, value, need):
    """A hyperparameter: a real number (not a bool, not an array) passing _RANGES[need] (nan passes none)."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool) \
            or not _RANGES[need](value):
        raise ValueError(f"{name} must be {need}, got {value!r}")


def describe(a):
    """What a bad argument was, for an error message: dtype and shape of an array, else its type."""
    return f"{a.dtype} array of shape {a.shape}" if hasattr(a, "dtype") and hasattr(a, "shape") else type(a).__name__


def _paths(tree, path):
    """(path, leaf) for every leaf of a tree, in tree_leaves' order, the path as Python indexes it: name[0]['W']."""
    if isinstance(tree, dict):
        return [item for key in sorted(tree) for item in _paths(tree[key], f"{path}[{key!r}]")]
    if isinstance(tree, (list, tuple)):
        return [item for i, sub in enumerate(tree) for item in _paths(sub, f"{path}[{i}]")]
    return [(path, tree)]


def _check_float_leaves(name, tree):
    """Every leaf a floating-point array: Adam and clipping move values by fractions, which an integer
    (or bool) leaf would round away, so such a leaf is refused by its path instead of silently not training."""
    for path, leaf in _paths(tree, name):
        if not hasattr(leaf, "dtype") or leaf.dtype.kind != "f":
            raise TypeError(f"{path} must be a floating-point array, got {describe(leaf)}")


def _check_adam_inputs(params, grads, state, decay, **numbers):
    """adam_step's arguments: hyperparameters in range; params float arrays; grads, state['m'] and state['v']
    mirroring params leaf by leaf (a state from another model is refused by path); decay None or bools
    mirroring params."""
    for name, need in (("lr", "a finite number >= 0"), ("beta1", "in [0, 1)"), ("beta2", "in [0, 1)"),
                       ("eps", "a positive finite number"), ("weight_decay", "a finite number >= 0")):
        _check_number(name, numbers[name], need)
    _check_float_leaves("params", params)
    check_tree("grads", grads, params)
    if not isinstance(state, dict) or set(state) != {"m", "v", "t"}:
        got = f"keys {sorted(state)}" if isinstance(state, dict) else type(state).__name__
        raise TypeError(f"state must be the dict adam_init or adam_step returned (keys ['m', 't', 'v']), got {got}")
    check_tree("state['m']", state["m"], params)
    check_tree("state['v']", state["v"], params)
    check_positive_int("state['t']", state["t"], minimum=0)
    if decay is not None:
        need, got = dict(_paths(params, "decay")), dict(_paths(decay, "decay"))
        if need.keys() != got.keys():
            raise ValueError(f"decay must mirror params (weight_decay_mask(params) does): missing "
                             f"{sorted(need.keys() - got.keys())}, extra {sorted(got.keys() - need.keys())}")
        for path, flag in got.items():
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{path} must be True or False, got {flag!r}")


def _check_cross_entropy_inputs(logits, targets, ignore_index, label_smoothing):
    if not hasattr(logits, "dtype") or logits.dtype.kind != "f" or logits.ndim < 1 or logits.shape[-1] == 0:
        raise TypeError(f"logits must be a floating-point array (..., V) with V >= 1, got {describe(logits)}")
    if not hasattr(targets, "dtype") or targets.dtype.kind not in "iu":
        raise TypeError(f"targets must be an integer array, got {getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets must have shape {logits.shape[:-1]} (logits without V), got {targets.shape}")
    if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}")
    _check_number("label_smoothing", label_smoothing, "a number in [0, 1]")
    V = logits.shape[-1]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))   # (...) out of range, not ignored
    if bool(bad.any()):
        got = int(targets[bad][0])
        raise ValueError(f"targets must be in [0, {V}) or ignore_index = {ignore_index}, got {got}")
