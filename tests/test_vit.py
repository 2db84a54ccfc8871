"""Tests for vit.py: each test name is the property it proves.

Tests taking `xp` run on NumPy, on CuPy on a CPU, and with a GPU on CuPy. Gradient checks are float64 with
random upstream gradients (tests/gradcheck.py).
"""
import importlib.util

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import check_directional_derivative, check_gradients, random_like
from helpers import random_array, run_demo, to_numpy
from training import tree_leaves, tree_map
from vit import (attention_rollout, attention_weights, class_token_backward, class_token_forward, head_backward,
                 head_forward, init_vit, patch_embed_backward, patch_embed_forward, patchify,
                 same_different_images, sincos_2d_positions, unpatchify, vit_backward, vit_forward)

seeds = st.integers(0, 2**32 - 1)


def make_model(seed, image_shape=(2, 4, 6), P=2, D=8, depth=2, positions="learned", dtype=np.float64, xp=np):
    """rng and a small ViT whose every parameter (LayerNorm and biases too) is random, on `xp`."""
    rng = np.random.default_rng(seed)
    params = init_vit(image_shape, P, D, depth, F=12, n_classes=3, rng=rng, positions=positions, dtype=dtype)
    params = tree_map(lambda p: xp.asarray((p + 0.3 * rng.standard_normal(p.shape)).astype(dtype)), params)
    return rng, params


def slow_convolution(images, weight, bias, P):
    """out[b, o, i, j] = bias[o] + sum_{c,y,x} weight[o, c, y, x] images[b, c, i*P + y, j*P + x], by loops."""
    B, C, H, W = images.shape
    out = np.zeros((B, weight.shape[0], H // P, W // P))
    for b, o, i, j in np.ndindex(out.shape):
        out[b, o, i, j] = bias[o]
        for c, y, x in np.ndindex(C, P, P):
            out[b, o, i, j] += weight[o, c, y, x] * images[b, c, i * P + y, j * P + x]
    return out


# ----------------------------------------------------------------------------------------------------
# Patches and the patch embedding


@given(seed=seeds, B=st.integers(1, 2), C=st.integers(1, 3), P=st.integers(1, 3), gh=st.integers(1, 3),
       gw=st.integers(1, 3))
@example(seed=0, B=1, C=3, P=2, gh=2, gw=3)
def test_unpatchify_inverts_patchify(xp, seed, B, C, P, gh, gw):
    rng = np.random.default_rng(seed)
    images = random_array(rng, (B, C, gh * P, gw * P), xp=xp)
    patches = patchify(images, P)
    assert patches.shape == (B, gh * gw, C * P * P)
    np.testing.assert_array_equal(to_numpy(unpatchify(patches, P, gh * P, gw * P)), to_numpy(images))
    np.testing.assert_array_equal(to_numpy(patchify(unpatchify(patches, P, gh * P, gw * P), P)), to_numpy(patches))


def test_patches_are_row_major_over_the_grid_and_flattened_as_channel_row_column():
    B, C, P, gh, gw = 2, 3, 2, 2, 3
    images = np.random.default_rng(0).standard_normal((B, C, gh * P, gw * P))
    patches = patchify(images, P)
    for b, gy, gx, c, y, x in np.ndindex(B, gh, gw, C, P, P):
        assert patches[b, gy * gw + gx, (c * P + y) * P + x] == images[b, c, gy * P + y, gx * P + x]


def test_patchify_backward_is_unpatchify():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((2, 2, 4, 6))
    dout = rng.standard_normal((2, 6, 8))
    check_gradients(lambda: float((patchify(images, 2) * dout).sum()), images, unpatchify(dout, 2, 4, 6))


def test_patch_embedding_equals_a_slow_stride_P_convolution(xp):
    rng = np.random.default_rng(2)
    B, C, H, W, P, D = 2, 3, 4, 6, 2, 5
    images, weight, bias = rng.standard_normal((B, C, H, W)), rng.standard_normal((D, C, P, P)), rng.standard_normal(D)
    params = {"W": xp.asarray(weight.reshape(D, -1).T), "b": xp.asarray(bias)}     # (C*P*P, D) as API.md says
    tokens, _ = patch_embed_forward(xp.asarray(images), params, P)                    # (B, N, D)
    expected = slow_convolution(images, weight, bias, P)                              # (B, D, H/P, W/P)
    # the same sums in another order: float64 rounding only
    np.testing.assert_allclose(to_numpy(tokens), expected.reshape(B, D, -1).transpose(0, 2, 1), rtol=1e-12, atol=1e-12)


def test_patch_embedding_matches_torch_conv2d_outputs_and_gradients():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    B, C, H, W, P, D = 2, 3, 6, 4, 2, 5
    conv = torch.nn.Conv2d(C, D, P, stride=P).double()
    images = rng.standard_normal((B, C, H, W))
    params = {"W": conv.weight.detach().numpy().reshape(D, -1).T.copy(), "b": conv.bias.detach().numpy().copy()}
    tokens, cache = patch_embed_forward(images, params, P)
    dtokens = rng.standard_normal(tokens.shape)
    dimages, grads = patch_embed_backward(dtokens, cache)
    x = torch.tensor(images, requires_grad=True)
    out = conv(x).flatten(2).transpose(1, 2)                                          # (B, N, D) row-major grid
    out.backward(torch.tensor(dtokens))
    np.testing.assert_allclose(tokens, out.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dimages, x.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["W"], conv.weight.grad.numpy().reshape(D, -1).T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads["b"], conv.bias.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_patch_embedding_gradients_match_finite_differences():
    rng = np.random.default_rng(4)
    images = rng.standard_normal((2, 2, 4, 2))
    params = {"W": rng.standard_normal((8, 3)), "b": rng.standard_normal(3)}
    tokens, cache = patch_embed_forward(images, params, 2)
    dtokens = random_like(tokens, rng)
    dimages, grads = patch_embed_backward(dtokens, cache)
    loss = lambda: float((patch_embed_forward(images, params, 2)[0] * dtokens).sum())
    check_gradients(loss, [images, params], [dimages, grads])


# ----------------------------------------------------------------------------------------------------
# Class token, positions, head


def test_class_token_gradients_match_finite_differences():
    rng = np.random.default_rng(5)
    tokens, cls = rng.standard_normal((3, 4, 5)), rng.standard_normal(5)
    x, cache = class_token_forward(tokens, cls)
    np.testing.assert_array_equal(x[:, 0], np.broadcast_to(cls, (3, 5)))             # class token first
    dx = random_like(x, rng)
    dtokens, dcls = class_token_backward(dx, cache)
    check_gradients(lambda: float((class_token_forward(tokens, cls)[0] * dx).sum()), [tokens, cls], [dtokens, dcls])


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_head_gradients_match_finite_differences(pool):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 5, 4))
    params = {"W": rng.standard_normal((4, 2)), "b": rng.standard_normal(2)}
    logits, cache = head_forward(x, params, pool)
    dlogits = random_like(logits, rng)
    dx, grads = head_backward(dlogits, cache)
    check_gradients(lambda: float((head_forward(x, params, pool)[0] * dlogits).sum()), [x, params], [dx, grads])


def test_sincos_table_follows_mae_layout_column_then_row_with_a_zero_class_row():
    table = sincos_2d_positions(2, 3, 8, dtype=np.float64)                           # w = 10000^(-i/2) = 1, 0.01
    assert table.shape == (7, 8)
    np.testing.assert_array_equal(table[0], 0)                                        # the class token's row
    r, c = 1, 2                                                                       # patch 1 + 1*3 + 2 = 6
    expected = [np.sin(c), np.sin(0.01 * c), np.cos(c), np.cos(0.01 * c),
                np.sin(r), np.sin(0.01 * r), np.cos(r), np.cos(0.01 * r)]
    np.testing.assert_allclose(table[6], expected, rtol=1e-14, atol=1e-15)
    # patches of one grid column share the first half, patches of one grid row the second
    np.testing.assert_array_equal(table[1 + 0 * 3 + 1, :4], table[1 + 1 * 3 + 1, :4])
    np.testing.assert_array_equal(table[1 + 1 * 3 + 0, 4:], table[1 + 1 * 3 + 2, 4:])
    assert sincos_2d_positions(2, 3, 8).dtype == np.float32


@pytest.mark.parametrize("positions", ["learned", "sincos", None])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_embedding_and_head_gradients_match_finite_differences_entry_by_entry(positions, pool):
    # depth 0: patch embedding, class token, positions, final LayerNorm and head, every entry nudged
    rng, params = make_model(7, image_shape=(1, 4, 4), D=4, depth=0, positions=positions)
    images = rng.standard_normal((2, 1, 4, 4))
    logits, cache = vit_forward(images, params, 2, 2, pool=pool, positions=positions)
    dlogits = random_like(logits, rng)
    dimages, grads = vit_backward(dlogits, cache)
    loss = lambda: float((vit_forward(images, params, 2, 2, pool=pool, positions=positions)[0] * dlogits).sum())
    check_gradients(loss, [images, params], [dimages, grads])


@pytest.mark.parametrize("positions", ["learned", "sincos", None])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_whole_model_gradient_along_a_random_direction(xp, positions, pool):
    rng, params = make_model(8, positions=positions, xp=xp)
    images = random_array(rng, (2, 2, 4, 6), xp=xp)
    logits, cache = vit_forward(images, params, 2, 2, pool=pool, positions=positions)
    dlogits = random_like(logits, rng)
    dimages, grads = vit_backward(dlogits, cache)
    assert set(grads) == set(params)
    assert all(g.shape == p.shape for g, p in zip(tree_leaves(grads), tree_leaves(params)))
    loss = lambda: float((vit_forward(images, params, 2, 2, pool=pool, positions=positions)[0] * dlogits).sum())
    check_directional_derivative(loss, [images, params], [dimages, grads], rng)


# ----------------------------------------------------------------------------------------------------
# Order: without positions a ViT cannot tell where a patch is


@pytest.mark.parametrize("positions", ["learned", "sincos", None])
def test_permuting_patches_permutes_patch_outputs_only_without_positions(xp, positions):
    rng, params = make_model(9, positions=positions, xp=xp)
    images = random_array(rng, (2, 2, 4, 6), xp=xp)
    perm = np.roll(np.arange(6), 2)
    shuffled = unpatchify(patchify(images, 2)[:, xp.asarray(perm)], 2, 4, 6)           # the same patches, moved
    out = {}
    for name, x in (("original", images), ("shuffled", shuffled)):
        logits, cache = vit_forward(x, params, 2, 2, positions=positions)
        out[name] = to_numpy(logits), to_numpy(cache["ln_f"]["xhat"])                # final states (B, N+1, D)
    (logits, states), (logits_s, states_s) = out["original"], out["shuffled"]
    if positions is None:
        # float64 rounding only: the same sums in another order
        np.testing.assert_allclose(logits_s, logits, rtol=1e-10, atol=1e-12)           # class token unchanged
        np.testing.assert_allclose(states_s[:, 1:], states[:, 1 + perm], rtol=1e-10, atol=1e-12)
    else:
        assert np.abs(logits_s - logits).max() > 1e-6                                 # rounding is ~1e-15
        assert np.abs(states_s[:, 1:] - states[:, 1 + perm]).max() > 1e-6


# ----------------------------------------------------------------------------------------------------
# Attention rollout


@given(seed=seeds, L=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 5))
def test_rollout_rows_are_non_negative_and_sum_to_one(xp, seed, L, H, T):
    rng = np.random.default_rng(seed)
    # any non-negative weights, rows not summing to 1 included (where a keepdims bug would show)
    weights = [xp.asarray(rng.random((2, H, T, T)) * rng.integers(0, 3, (2, H, T, 1))) for _ in range(L)]
    rollout = to_numpy(attention_rollout(weights))
    assert rollout.shape == (2, T, T) and (rollout >= 0).all()
    np.testing.assert_allclose(rollout.sum(axis=-1), 1, rtol=1e-12)


def test_identity_attention_rolls_out_to_the_identity(xp):
    eye = xp.asarray(np.broadcast_to(np.eye(5), (2, 3, 5, 5)).copy())
    np.testing.assert_array_equal(to_numpy(attention_rollout([eye, eye, eye])), np.broadcast_to(np.eye(5), (2, 5, 5)))


def test_rollout_of_two_layers_by_hand():
    layer_1 = np.array([[[[1, 0], [0.5, 0.5]], [[0, 1], [0.5, 0.5]]]])   # heads average to all 0.5
    layer_2 = np.array([[[[1, 0], [1, 0]], [[1, 0], [1, 0]]]])
    # A_1 = rownorm([[1.5, .5], [.5, 1.5]]) = [[.75, .25], [.25, .75]];  A_2 = rownorm([[2, 0], [1, 1]])
    # R = A_2 A_1 = [[1, 0], [.5, .5]] [[.75, .25], [.25, .75]]   (A_1 A_2 would give [[.875, .125], ...])
    np.testing.assert_allclose(attention_rollout([layer_1, layer_2])[0], [[0.75, 0.25], [0.5, 0.5]], rtol=1e-15)


def test_rollout_divides_each_row_by_its_own_sum_not_the_keepdims_bug():
    weights = np.array([[[[1.0, 1.0], [0.0, 0.5]]]])                     # rows of W + I sum to 3 and 1.5
    np.testing.assert_allclose(attention_rollout([weights])[0], [[2 / 3, 1 / 3], [0, 1]], rtol=1e-15)
    a = weights.mean(axis=1) + np.eye(2)
    without_keepdims = a / a.sum(axis=-1)                                 # divides column j by row j's sum
    assert not np.allclose(without_keepdims.sum(axis=-1), 1)              # so the check above would fail


def test_rollout_of_a_model_reads_every_layer():
    rng, params = make_model(10, depth=3)
    _, cache = vit_forward(rng.standard_normal((2, 2, 4, 6)), params, 2, 2)
    weights = attention_weights(cache)
    assert len(weights) == 3 and weights[0].shape == (2, 2, 7, 7)        # (B, H, N+1, N+1)
    np.testing.assert_allclose(attention_rollout(weights).sum(axis=-1), 1, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------
# Data, training, dtypes, devices, errors


def test_same_different_images_put_two_patterns_in_noise_with_balanced_labels():
    images, labels, marked = same_different_images(400, np.random.default_rng(11), noise=0.0)
    assert images.shape == (400, 1, 16, 16) and images.dtype == np.float32
    patches = patchify(images, 4)[:, :, :]                               # (n, 16, 16)
    first, second = patches[np.arange(400), marked[:, 0]], patches[np.arange(400), marked[:, 1]]
    assert (np.abs(first) == 1).all() and (np.abs(second) == 1).all()
    np.testing.assert_array_equal((first == second).all(axis=1), labels == 1)
    assert np.count_nonzero(patches.any(axis=2), axis=1).max() == 2       # nothing else without noise
    assert 150 < labels.sum() < 250                                       # balanced: chance is 50 %


def test_demo_trains_far_above_chance_and_rollout_finds_the_marked_patches(tmp_path):
    # --quick: 400 steps, the demo asserts held-out accuracy >= 0.80 (chance 0.5) and that both marked
    # patches get more rollout mass than the average patch in > 90 % of test images
    figure = tmp_path / "rollout.png"
    result = run_demo("vit.py", "--quick", "--figure", figure, timeout=120)
    assert "held-out accuracy" in result.stdout
    assert importlib.util.find_spec("matplotlib") is None or figure.stat().st_size > 1000


def test_float32_stays_float32(xp):
    rng, params = make_model(12, dtype=np.float32, xp=xp)
    images = random_array(rng, (2, 2, 4, 6), dtype=np.float32, xp=xp)
    for positions in ("learned", "sincos"):
        logits, cache = vit_forward(images, params, 2, 2, positions=positions)
        dimages, grads = vit_backward(xp.ones_like(logits), cache)
        assert logits.dtype == dimages.dtype == np.float32
        assert all(g.dtype == np.float32 for g in tree_leaves(grads))
        assert attention_rollout(attention_weights(cache)).dtype == np.float32


def test_numpy_and_the_array_module_agree(xp):
    results = []
    for module in (np, xp):
        rng, params = make_model(13, xp=module)
        logits, cache = vit_forward(random_array(rng, (2, 2, 4, 6), xp=module), params, 2, 2, pool="mean")
        dimages, grads = vit_backward(module.asarray(rng.standard_normal(logits.shape)), cache)
        results.append([to_numpy(a) for a in [logits, dimages, *tree_leaves(grads)]])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)      # same math, library summation orders


def test_inputs_and_params_are_never_modified(xp):
    rng, params = make_model(15, xp=xp)
    images = random_array(rng, (2, 2, 4, 6), xp=xp)
    before = [to_numpy(a).copy() for a in [images, *tree_leaves(params)]]
    logits, cache = vit_forward(images, params, 2, 2, positions="learned")
    dlogits = random_like(logits, rng)
    dlogits_before = to_numpy(dlogits).copy()
    vit_backward(dlogits, cache)
    attention_rollout(attention_weights(cache))
    for a, b in zip([images, *tree_leaves(params)], before):
        np.testing.assert_array_equal(to_numpy(a), b)
    np.testing.assert_array_equal(to_numpy(dlogits), dlogits_before)


def test_bad_input_gets_clear_errors():
    rng, params = make_model(14)
    good = rng.standard_normal((2, 2, 4, 6))
    with pytest.raises(ValueError, match=r"images must have shape \(B, C, H, W\), got \(2, 4, 6\)"):
        vit_forward(good[0], params, 2, 2)
    with pytest.raises(ValueError, match=r"images must have C = 2 channels.*got \(2, 3, 4, 6\)"):
        vit_forward(rng.standard_normal((2, 3, 4, 6)), params, 2, 2)
    with pytest.raises(ValueError, match=r"multiples of P = 2, got \(2, 2, 5, 6\)"):
        vit_forward(rng.standard_normal((2, 2, 5, 6)), params, 2, 2)
    with pytest.raises(ValueError, match=r"params\['pos'\] must have shape \(13, 8\)"):
        vit_forward(rng.standard_normal((2, 2, 4, 12)), params, 2, 2)        # more patches than the table
    with pytest.raises(TypeError, match="images must be a floating-point array"):
        vit_forward(good.astype(np.int64), params, 2, 2)
    with pytest.raises(ValueError, match="pool must be 'cls' or 'mean'"):
        vit_forward(good, params, 2, 2, pool="max")
    with pytest.raises(ValueError, match="positions must be 'learned', 'sincos' or None"):
        vit_forward(good, params, 2, 2, positions="rope")
    logits, cache = vit_forward(good, params, 2, 2)
    with pytest.raises(ValueError, match=r"dlogits must"):
        vit_backward(logits[:1], cache)
    with pytest.raises(ValueError, match=r"patches must have shape \(B, 4, C\*4\)"):
        unpatchify(patchify(good, 2), 2, 4, 4)
    with pytest.raises(ValueError, match="P must be a positive integer"):
        patchify(good, 0)
    with pytest.raises(ValueError, match="D must be a positive multiple of 4"):
        sincos_2d_positions(2, 2, 6)
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape \(B, heads, N\+1, N\+1\)"):
        attention_rollout([np.ones((1, 2, 3, 3)), np.ones((1, 2, 3, 4))])
    with pytest.raises(ValueError, match="weights must be a non-empty list"):
        attention_rollout([])
