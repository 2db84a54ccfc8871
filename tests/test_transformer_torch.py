"""transformer.py against PyTorch, in float64: layer norm, both GELUs, encoder and decoder layers (pre- and
post-LN, ReLU and GELU, padding and causal masks) and a whole decoder-only model (tied and untied), outputs
and every gradient, with PyTorch's modules and our weights copied into them.

Weight layout: our linear maps are y = x W + b with W (in, out); torch.nn.Linear stores W^T (out, in).
torch.nn.MultiheadAttention's in_proj_weight (3D, D) stacks W_q^T, W_k^T, W_v^T. torch's boolean masks
mean True = may NOT attend, the opposite of ours. Skips cleanly where torch is not installed; every claim
here is also checked without torch in tests/test_transformer.py (finite differences, hand-computed values).
Cross-entropy against torch is tests/test_training.py's.
"""
import math

import numpy as np
import pytest

import transformer
from helpers import random_array

torch = pytest.importorskip("torch")
F = torch.nn.functional

# float64 on both sides; only the order of summation differs, so agreement is to ~1e-13 relative. 1e-10
# (with an absolute floor for entries that cancel to near 0) leaves room for a few layers of rounding while
# any wrong term (a missed residual path, a transposed weight, a swapped norm) is off by O(1e-2) or more.
CLOSE = dict(rtol=1e-10, atol=1e-12)
B, T, S, D, H, FF = 2, 5, 4, 8, 2, 12


def tensor(x, grad=True):
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def assert_trees_close(ours, theirs, path="grads", **tolerance):
    """Every leaf of `ours` (nested dicts / lists of arrays) equals the same leaf of `theirs`, naming the path."""
    if isinstance(ours, dict):
        assert set(ours) == set(theirs), f"{path}: keys {sorted(ours)} vs {sorted(theirs)}"
        for key in ours:
            assert_trees_close(ours[key], theirs[key], f"{path}[{key!r}]", **tolerance)
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), f"{path}: {len(ours)} vs {len(theirs)} items"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_trees_close(a, b, f"{path}[{i}]", **tolerance)
    else:
        np.testing.assert_allclose(ours, theirs, err_msg=path, **(tolerance or CLOSE))


# ----------------------------------------------------------------------------------------------------
# Copying a layer's weights into torch and reading torch's gradients back in our layout

TORCH_NAMES = {"attn": "self_attn", "cross_attn": "multihead_attn", "ln1": "norm1", "ln2": "norm2", "ln3": "norm3"}


def copy_into_torch(layer, params):
    """Copy our encoder/decoder layer params into torch's TransformerEncoderLayer / TransformerDecoderLayer."""
    with torch.no_grad():
        for ours, theirs in TORCH_NAMES.items():
            if ours not in params:
                continue
            p, module = params[ours], getattr(layer, theirs)
            if ours.startswith("ln"):
                module.weight.copy_(torch.from_numpy(p["gamma"]))
                module.bias.copy_(torch.from_numpy(p["beta"]))
                continue
            module.in_proj_weight.copy_(torch.from_numpy(np.concatenate([p["W_q"].T, p["W_k"].T, p["W_v"].T])))
            module.in_proj_bias.copy_(torch.from_numpy(np.concatenate([p["b_q"], p["b_k"], p["b_v"]])))
            module.out_proj.weight.copy_(torch.from_numpy(p["W_o"].T))
            module.out_proj.bias.copy_(torch.from_numpy(p["b_o"]))
        for i in (1, 2):
            linear = getattr(layer, f"linear{i}")
            linear.weight.copy_(torch.from_numpy(params["ff"][f"W_{i}"].T))
            linear.bias.copy_(torch.from_numpy(params["ff"][f"b_{i}"]))


def grads_from_torch(layer, params):
    """torch's .grad of every weight of `layer`, as a tree shaped like our params (W back to (in, out))."""
    grads = {}
    for ours, theirs in TORCH_NAMES.items():
        if ours not in params:
            continue
        module = getattr(layer, theirs)
        if ours.startswith("ln"):
            grads[ours] = {"gamma": module.weight.grad.numpy(), "beta": module.bias.grad.numpy()}
            continue
        d_in_w, d_in_b = module.in_proj_weight.grad.numpy(), module.in_proj_bias.grad.numpy()
        grads[ours] = {"W_o": module.out_proj.weight.grad.numpy().T, "b_o": module.out_proj.bias.grad.numpy()}
        for i, name in enumerate("qkv"):
            grads[ours][f"W_{name}"] = d_in_w[i * D:(i + 1) * D].T
            grads[ours][f"b_{name}"] = d_in_b[i * D:(i + 1) * D]
    grads["ff"] = {}
    for i in (1, 2):
        linear = getattr(layer, f"linear{i}")
        grads["ff"][f"W_{i}"], grads["ff"][f"b_{i}"] = linear.weight.grad.numpy().T, linear.bias.grad.numpy()
    return grads


def randomize_norms(params, rng):
    """LayerNorms start as the identity (gamma 1, beta 0); random ones make their gradients matter."""
    for key in ("ln1", "ln2", "ln3"):
        if key in params:
            params[key] = {"gamma": 1 + 0.3 * random_array(rng, (D,)), "beta": 0.3 * random_array(rng, (D,))}
    return params


def torch_activation(activation):
    """What torch's layers take: 'relu' and 'gelu' (exact) by name, GPT-2's tanh GELU as a callable."""
    return (lambda z: F.gelu(z, approximate="tanh")) if activation == "gelu_tanh" else activation


def padding_keep(rng, B, L):
    """(B, L) True = a real token: each row keeps a random-length prefix (at least 2), padding after it.

    Right padding keeps every causal query row with at least one key (its first), so torch gives no nan."""
    lengths = rng.integers(2, L + 1, size=B)
    lengths[0] = L - 1                                          # at least one row is really padded
    return np.arange(L)[None, :] < lengths[:, None]


def causal_keep(L):
    """(L, L) True where query t may see key j <= t."""
    return np.tril(np.ones((L, L), dtype=bool))


# ----------------------------------------------------------------------------------------------------
# Layer normalization


@pytest.mark.parametrize("mean", [0.0, 2000.0], ids=["centred", "mean-2000"])
def test_layer_norm_matches_torch_layer_norm_forward_and_every_gradient(mean):
    rng = np.random.default_rng(0)
    x = mean + random_array(rng, (3, 4, D))
    gamma, beta = 1 + 0.5 * random_array(rng, (D,)), random_array(rng, (D,))
    y, cache = transformer.layer_norm_forward(x, gamma, beta)
    dout = random_array(rng, y.shape)                          # random: all ones would hide the var term
    dx, dgamma, dbeta = transformer.layer_norm_backward(dout, cache)

    norm = torch.nn.LayerNorm(D, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(gamma))
        norm.bias.copy_(torch.from_numpy(beta))
    tx = tensor(x)
    ty = norm(tx)
    ty.backward(torch.from_numpy(dout))
    # With mean 2000 and std 1, E[x^2] - E[x]^2 loses 4e6 * 1e-16 = 4e-10 of the variance (measured: 4e-9 in
    # y), so 1e-10 also proves the mean is subtracted before squaring; both sides lose only x's own rounding.
    np.testing.assert_allclose(y, ty.detach().numpy(), **CLOSE)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **CLOSE)
    np.testing.assert_allclose(dgamma, norm.weight.grad.numpy(), **CLOSE)
    np.testing.assert_allclose(dbeta, norm.bias.grad.numpy(), **CLOSE)


def test_float32_layer_norm_with_mean_2000_agrees_with_torch_to_float32_spacing_there():
    rng = np.random.default_rng(1)
    x = (2000 + rng.standard_normal((4, 6, 32))).astype(np.float32)
    gamma = (1 + 0.5 * rng.standard_normal(32)).astype(np.float32)
    beta = rng.standard_normal(32).astype(np.float32)
    y, _ = transformer.layer_norm_forward(x, gamma, beta)
    assert y.dtype == np.float32
    norm = torch.nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(gamma))
        norm.bias.copy_(torch.from_numpy(beta))
    ty = norm(torch.from_numpy(x)).detach().numpy()
    # float32 values near 2000 are 1.2e-4 apart, so each side's mean (and so x - mean, in units of std 1) is
    # off by about that, times |gamma| <= ~2.5: 2e-3 bounds it. The naive E[x^2] - E[x]^2 in float32 is off
    # by O(1) here (measured 2.5): float32 spacing near x^2 = 4e6 is 0.25, the size of the variance itself.
    np.testing.assert_allclose(y, ty, rtol=0, atol=2e-3)


# ----------------------------------------------------------------------------------------------------
# Activations


GRID = np.concatenate([np.linspace(-10, 10, 4001), [-1e-300, 0.0, 1e-300, -7.5, 7.5]])   # |x| up to 10


@pytest.mark.parametrize("kind, approximate", [("gelu", "none"), ("gelu_tanh", "tanh"), ("relu", None)])
def test_activation_matches_torch_forward_and_backward_on_a_wide_grid(kind, approximate):
    rng = np.random.default_rng(2)
    out, cache = transformer.activation_forward(GRID, kind)
    dout = random_array(rng, GRID.shape)
    dx = transformer.activation_backward(dout, cache)
    tx = tensor(GRID)
    t_out = F.relu(tx) if kind == "relu" else F.gelu(tx, approximate=approximate)
    t_out.backward(torch.from_numpy(dout))
    # torch computes Phi(x) as 0.5 * (1 + erf(x / sqrt 2)), which rounds to a multiple of 2^-53 ~ 1.1e-16 near
    # 0 (x << 0), where ours (erfc) keeps relative accuracy: the absolute floor is that rounding times
    # |x| <= 10 and |dout| ~ 3. Elsewhere both are within a few ulp.
    tolerance = dict(rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(out, t_out.detach().numpy(), **tolerance)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tolerance)


def test_exact_and_tanh_gelu_differ_by_up_to_4_7e_4_so_each_must_be_compared_with_its_own_torch_twin():
    exact = transformer.activation_forward(GRID, "gelu")[0]
    approximate = transformer.activation_forward(GRID, "gelu_tanh")[0]
    gap = np.abs(exact - approximate)
    # Measured 4.732e-4 at x = -2.70 (the grid step 0.005 lands within 1e-8 of the peak).
    assert 4.7e-4 < gap.max() < 4.8e-4
    assert abs(abs(GRID[np.argmax(gap)]) - 2.7) < 0.05
    swapped = F.gelu(torch.from_numpy(GRID), approximate="tanh").numpy()
    assert np.abs(exact - swapped).max() > 1e-4                # so a swap fails even a 1e-4 comparison


# ----------------------------------------------------------------------------------------------------
# Encoder and decoder layers


ENCODER_CASES = [(norm_first, activation, masking)
                 for norm_first in (True, False)
                 for activation in ("relu", "gelu")
                 for masking in ("padding", "causal")] + [(True, "gelu_tanh", "causal")]


@pytest.mark.parametrize("norm_first, activation, masking", ENCODER_CASES)
def test_encoder_layer_matches_torch_transformer_encoder_layer(norm_first, activation, masking):
    rng = np.random.default_rng(3)
    params = randomize_norms(transformer.init_encoder_layer(D, FF, rng, np.float64), rng)
    x = random_array(rng, (B, T, D))
    keep = padding_keep(rng, B, T)                             # (B, T)
    mask = keep[:, None, None, :] if masking == "padding" else None
    out, cache = transformer.encoder_layer_forward(x, params, H, mask=mask, norm_first=norm_first,
                                                   activation=activation, causal=masking == "causal")
    dout = random_array(rng, out.shape)
    dx, grads = transformer.encoder_layer_backward(dout, cache)

    layer = torch.nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, activation=torch_activation(activation),
                                             batch_first=True, norm_first=norm_first, dtype=torch.float64)
    copy_into_torch(layer, params)
    tx = tensor(x)
    if masking == "padding":
        t_out = layer(tx, src_key_padding_mask=torch.from_numpy(~keep))
    else:
        t_out = layer(tx, src_mask=torch.from_numpy(~causal_keep(T)))
    t_out.backward(torch.from_numpy(dout))

    np.testing.assert_allclose(out, t_out.detach().numpy(), **CLOSE)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **CLOSE)
    assert_trees_close(grads, grads_from_torch(layer, params))


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_decoder_layer_matches_torch_transformer_decoder_layer(norm_first, activation):
    rng = np.random.default_rng(4)
    params = randomize_norms(transformer.init_decoder_layer(D, FF, rng, np.float64), rng)
    y, memory = random_array(rng, (B, T, D)), random_array(rng, (B, S, D))
    tgt_keep, memory_keep = padding_keep(rng, B, T), padding_keep(rng, B, S)          # (B, T), (B, S)
    out, cache = transformer.decoder_layer_forward(y, memory, params, H, memory_mask=memory_keep[:, None, None, :],
                                                   norm_first=norm_first, activation=activation,
                                                   tgt_mask=tgt_keep[:, None, None, :])
    dout = random_array(rng, out.shape)
    dy, dmemory, grads = transformer.decoder_layer_backward(dout, cache)

    layer = torch.nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, activation=activation, batch_first=True,
                                             norm_first=norm_first, dtype=torch.float64)
    copy_into_torch(layer, params)
    ty, t_memory = tensor(y), tensor(memory)
    t_out = layer(ty, t_memory, tgt_mask=torch.from_numpy(~causal_keep(T)),   # our decoder is always causal
                  tgt_key_padding_mask=torch.from_numpy(~tgt_keep),
                  memory_key_padding_mask=torch.from_numpy(~memory_keep))
    t_out.backward(torch.from_numpy(dout))

    np.testing.assert_allclose(out, t_out.detach().numpy(), **CLOSE)
    np.testing.assert_allclose(dy, ty.grad.numpy(), **CLOSE)
    np.testing.assert_allclose(dmemory, t_memory.grad.numpy(), **CLOSE)
    assert_trees_close(grads, grads_from_torch(layer, params))


# ----------------------------------------------------------------------------------------------------
# A whole decoder-only model (GPT): the loss and every gradient


def torch_decoder_only_loss(params, config, tokens, targets):
    """The same GPT built from torch modules with our weights: returns (loss, grads_of() -> our-layout tree)."""
    V, L = config["V"], tokens.shape[1]
    embed = torch.nn.Embedding(V, D, dtype=torch.float64)
    layers = [torch.nn.TransformerEncoderLayer(D, config["n_heads"], config["F"], dropout=0.0,
                                               activation=config["activation"], batch_first=True, norm_first=True,
                                               dtype=torch.float64) for _ in params["decoder"]]
    final_norm = torch.nn.LayerNorm(D, dtype=torch.float64)
    pos, b_out = tensor(params["pos"]), tensor(params["b_out"])
    with torch.no_grad():
        embed.weight.copy_(torch.from_numpy(params["embed"]))
        for layer, layer_params in zip(layers, params["decoder"]):
            copy_into_torch(layer, layer_params)
        final_norm.weight.copy_(torch.from_numpy(params["dec_norm"]["gamma"]))
        final_norm.bias.copy_(torch.from_numpy(params["dec_norm"]["beta"]))
    W_out = embed.weight if config["tied"] else tensor(params["W_out"].T)            # torch layout (V, D)

    t_tokens = torch.from_numpy(tokens)
    x = embed(t_tokens) * math.sqrt(D) + pos[:L]               # embed_forward: sqrt(D) * embed[ids] + pos[:T]
    causal = torch.from_numpy(~causal_keep(L))
    padding = t_tokens == config["pad_id"]
    for layer in layers:
        x = layer(x, src_mask=causal, src_key_padding_mask=padding)
    logits = F.linear(final_norm(x), W_out, b_out)             # (B, L, V)
    loss = F.cross_entropy(logits.reshape(-1, V), torch.from_numpy(targets).reshape(-1), ignore_index=-100)
    loss.backward()

    grads = {"embed": embed.weight.grad.numpy(), "pos": pos.grad.numpy(), "b_out": b_out.grad.numpy(),
             "decoder": [grads_from_torch(layer, p) for layer, p in zip(layers, params["decoder"])],
             "dec_norm": {"gamma": final_norm.weight.grad.numpy(), "beta": final_norm.bias.grad.numpy()}}
    if not config["tied"]:
        grads["W_out"] = W_out.grad.numpy().T
    return loss.item(), grads


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_decoder_only_model_loss_and_every_gradient_match_the_same_model_built_from_torch_modules(tied, activation):
    rng = np.random.default_rng(5)
    config = transformer.check_config({"kind": "decoder", "V": 11, "D": D, "n_heads": H, "F": FF, "n_layers": 2,
                                       "max_len": 8, "positions": "learned", "norm_first": True,
                                       "activation": activation, "tied": tied, "pad_id": 0})
    params = transformer.init_transformer(config, rng, np.float64)
    params["b_out"] = 0.1 * random_array(rng, (config["V"],))             # zero at init: make it matter
    params["decoder"] = [randomize_norms(layer, rng) for layer in params["decoder"]]
    params["dec_norm"] = {"gamma": 1 + 0.3 * random_array(rng, (D,)), "beta": 0.3 * random_array(rng, (D,))}
    L = 7
    keep = padding_keep(rng, B, L)                             # (B, L) right padding with pad_id 0
    tokens = np.where(keep, rng.integers(1, config["V"], size=(B, L)), 0)
    targets = np.where(keep, np.roll(tokens, -1, axis=1), -100)           # next token; padding ignored
    targets[:, -1] = -100

    loss, cache = transformer.lm_loss_forward(tokens, targets, params, config)
    grads = transformer.lm_loss_backward(1.0, cache)
    t_loss, t_grads = torch_decoder_only_loss(params, config, tokens, targets)

    assert set(grads) == set(params) == set(t_grads)
    assert math.isclose(loss, t_loss, rel_tol=1e-12)
    # Two layers, a final norm and the loss: each gradient is a sum over B * L positions of products of a few
    # dozen float64 roundings, still far inside 1e-10 relative; the floor covers entries that cancel to ~0.
    assert_trees_close(grads, t_grads, rtol=1e-10, atol=1e-13)
