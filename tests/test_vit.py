"""Tests for vit.py, what they prove (each test name is the property it proves):

- patchify then unpatchify is the identity, and patches are laid out row-major as (C, P, P): the patch
  embedding equals a convolution written as loops (and torch.nn.Conv2d where installed), outputs and
  gradients;
- finite differences with random upstream gradients for patchify, the patch embedding, the class token,
  the head (both poolings) and whole models with each position scheme, along a random direction;
- the forward equals the composition the docstring writes; MAE's 2D sine-cosine layout against
  hand-computed values; without positions, permuting the patches permutes the patch outputs and leaves
  the class token's unchanged, and either position scheme breaks that;
- attention rollout: heads averaged, identity added, each row divided by its own sum (the keepdims bug
  that divides column j by row j's sum fails), layers multiplied in order (a 2-layer example by hand);
  weights that are not probabilities are refused;
- the demo reaches its stated accuracy (chance is 0.5) and rollout finds the marked patches; no step runs
  at learning rate 0;
- every wrong call is refused by name: a config field, a params tree built for another config, images of
  another dtype than the params, a cache from another function, an rng that is not a Generator.

Tests taking `xp` run on NumPy, on CuPy on a CPU, and with a GPU on CuPy. Gradient checks are float64 with
random upstream gradients (tests/gradcheck.py).
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import check_directional_derivative, check_gradients, random_like
from helpers import ROOT, random_array, run_demo, spoiled, to_numpy
from training import tree_leaves, tree_map
from transformer import encoder_layer_forward, layer_norm_forward
from vit import (attention_rollout, attention_weights, check_config, class_token_backward, class_token_forward,
                 head_backward, head_forward, init_vit, patch_embed_backward, patch_embed_forward, patchify,
                 same_different_images, sincos_2d_positions, unpatchify, vit_backward, vit_forward)

import vit

seeds = st.integers(0, 2**32 - 1)


def make_model(seed, image_shape=(2, 4, 6), P=2, D=8, n_layers=2, positions="learned", pool="cls",
               dtype=np.float64, xp=np):
    """rng, a small ViT whose every parameter (LayerNorm and biases too) is random, on `xp`, and its config."""
    rng = np.random.default_rng(seed)
    config = {"image_shape": image_shape, "P": P, "D": D, "n_heads": 2, "F": 12, "n_layers": n_layers,
              "n_classes": 3, "positions": positions, "pool": pool}
    params = init_vit(config, rng, dtype)
    params = tree_map(lambda p: xp.asarray((p + 0.3 * rng.standard_normal(p.shape)).astype(dtype)), params)
    return rng, params, config


def slow_convolution(images, weight, bias, P):
    """out[b, o, i, j] = bias[o] + sum_{c,y,x} weight[o, c, y, x] images[b, c, i*P + y, j*P + x], by loops."""
    B, C, H, W = images.shape
    out = np.zeros((B, weight.shape[0], H // P, W // P))
    for b, o, i, j in np.ndindex(out.shape):
        out[b, o, i, j] = bias[o]
        for c, y, x in np.ndindex(C, P, P):
            out[b, o, i, j] += weight[o, c, y, x] * images[b, c, i * P + y, j * P + x]
    return out


def softmax_rows(rng, shape, xp=np):
    """Random attention probabilities: non-negative rows summing to 1 (some close to one-hot)."""
    scores = rng.standard_normal(shape) * rng.choice([0.5, 8.0], shape[:-1] + (1,))
    w = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return xp.asarray(w / w.sum(axis=-1, keepdims=True))


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
    params = {"W": xp.asarray(weight.reshape(D, -1).T), "b": xp.asarray(bias)}     # (C*P*P, D): Conv2d's, reshaped
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


def test_class_token_is_first_the_same_for_every_image_and_gradients_match_finite_differences():
    rng = np.random.default_rng(5)
    tokens, cls = rng.standard_normal((3, 4, 5)), rng.standard_normal(5)
    x, cache = class_token_forward(tokens, cls)
    np.testing.assert_array_equal(x[:, 0], np.broadcast_to(cls, (3, 5)))             # class token first
    np.testing.assert_array_equal(x[:, 1:], tokens)                                   # then the patches, in order
    dx = random_like(x, rng)
    dtokens, dcls = class_token_backward(dx, cache)
    check_gradients(lambda: float((class_token_forward(tokens, cls)[0] * dx).sum()), [tokens, cls], [dtokens, dcls])
    with pytest.raises(ValueError, match=r"dout must have shape \(3, 5, 5\) \(the forward output's\), got \(3, 4, 5\)"):
        class_token_backward(dx[:, 1:], cache)                                        # a gradient of the wrong shape
    with pytest.raises(TypeError, match="cache must be the dict class_token_forward returned"):
        class_token_backward(dx, {})


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_head_gradients_match_finite_differences(pool):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 5, 4))
    params = {"W": rng.standard_normal((4, 2)), "b": rng.standard_normal(2)}
    logits, cache = head_forward(x, params, pool)
    dlogits = random_like(logits, rng)
    dx, grads = head_backward(dlogits, cache)
    check_gradients(lambda: float((head_forward(x, params, pool)[0] * dlogits).sum()), [x, params], [dx, grads])


def test_cls_pooling_reads_the_class_token_and_mean_pooling_the_average_of_the_patches_only():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((3, 5, 4))                                                # (B, N+1, D)
    params = {"W": rng.standard_normal((4, 2)), "b": rng.standard_normal(2)}
    # float64 rounding of one small matmul
    np.testing.assert_allclose(head_forward(x, params, "cls")[0], x[:, 0] @ params["W"] + params["b"], rtol=1e-13)
    np.testing.assert_allclose(head_forward(x, params, "mean")[0], x[:, 1:].mean(axis=1) @ params["W"] + params["b"],
                               rtol=1e-13)
    other = x.copy()
    other[:, 0] += 5.0                                                                # a different class token
    np.testing.assert_array_equal(head_forward(other, params, "mean")[0], head_forward(x, params, "mean")[0])


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


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "none"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_forward_is_the_composition_the_docstring_writes(positions, pool):
    # patches W_p + b_p, class token first, positions, pre-LN layers, final LayerNorm, pooled head
    rng, params, config = make_model(17, positions=positions, pool=pool)
    images = rng.standard_normal((2, 2, 4, 6))
    x = patchify(images, 2) @ params["patch"]["W"] + params["patch"]["b"]             # (B, N, D)
    x = np.concatenate([np.broadcast_to(params["cls"], (2, 1, 8)), x], axis=1)        # (B, N+1, D)
    x = x + {"learned": params.get("pos"), "sinusoidal": sincos_2d_positions(2, 3, 8, dtype=np.float64),
             "none": 0}[positions]
    for layer in params["layers"]:
        x = encoder_layer_forward(x, layer, 2, norm_first=True)[0]
    x = layer_norm_forward(x, params["ln_f"]["gamma"], params["ln_f"]["beta"])[0]
    pooled = x[:, 0] if pool == "cls" else x[:, 1:].mean(axis=1)
    # the same operations in the same order
    logits, cache = vit_forward(images, params, config)
    np.testing.assert_allclose(logits, pooled @ params["head"]["W"] + params["head"]["b"], rtol=1e-13, atol=1e-14)
    assert set(cache) == {"config", "patch", "cls", "pos", "layers", "ln_f", "head"}
    assert (cache["pos"] is None) == (positions != "learned")


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "none"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_small_model_gradients_match_finite_differences_entry_by_entry(positions, pool):
    # patch embedding, class token, positions, one layer, final LayerNorm and head: every entry nudged
    rng, params, config = make_model(7, image_shape=(1, 4, 4), D=4, n_layers=1, positions=positions, pool=pool)
    images = rng.standard_normal((2, 1, 4, 4))
    logits, cache = vit_forward(images, params, config)
    dlogits = random_like(logits, rng)
    dimages, grads = vit_backward(dlogits, cache)
    loss = lambda: float((vit_forward(images, params, config)[0] * dlogits).sum())
    check_gradients(loss, [images, params], [dimages, grads])


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "none"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_whole_model_gradient_along_a_random_direction(xp, positions, pool):
    rng, params, config = make_model(8, positions=positions, pool=pool, xp=xp)
    images = random_array(rng, (2, 2, 4, 6), xp=xp)
    logits, cache = vit_forward(images, params, config)
    dlogits = random_like(logits, rng)
    dimages, grads = vit_backward(dlogits, cache)
    assert set(grads) == set(params)
    assert all(g.shape == p.shape for g, p in zip(tree_leaves(grads), tree_leaves(params)))
    loss = lambda: float((vit_forward(images, params, config)[0] * dlogits).sum())
    check_directional_derivative(loss, [images, params], [dimages, grads], rng)


def test_init_draws_as_its_docstring_says():
    config = {"image_shape": (3, 32, 32), "P": 4, "D": 64, "n_classes": 10}
    params = init_vit(config, np.random.default_rng(18))
    assert len(params["layers"]) == 2 and params["layers"][0]["ff"]["W_1"].shape == (64, 256)   # defaults: 2, 4 D
    for W, fan_in in ((params["patch"]["W"], 3 * 4 * 4), (params["head"]["W"], 64)):
        assert np.abs(W).max() <= 1 / np.sqrt(fan_in) and np.abs(W).max() > 0.9 / np.sqrt(fan_in)
    assert not params["patch"]["b"].any() and not params["head"]["b"].any()
    assert params["pos"].shape == (65, 64) and 0.018 < params["pos"].std() < 0.022    # 4160 draws of N(0, 0.02^2)
    assert all(p.dtype == np.float32 for p in tree_leaves(params))
    assert "pos" not in init_vit({**config, "positions": "sinusoidal"}, np.random.default_rng(0))


def test_check_config_fills_defaults_and_leaves_its_argument_alone():
    config = {"image_shape": [1, 8, 8], "P": 4, "D": 16, "n_classes": 2}
    full = check_config(config)
    assert full == {"image_shape": (1, 8, 8), "P": 4, "D": 16, "n_classes": 2, "n_heads": 4, "F": 64,
                    "n_layers": 2, "positions": "learned", "pool": "cls"}
    assert config == {"image_shape": [1, 8, 8], "P": 4, "D": 16, "n_classes": 2}
    assert check_config(full) == full


@pytest.mark.parametrize("positions", ["sinusoidal", "none"])
def test_without_a_learned_table_other_image_sizes_work_and_with_one_they_are_refused(positions):
    rng, params, config = make_model(19, positions=positions)
    logits, _ = vit_forward(rng.standard_normal((2, 2, 8, 2)), params, config)       # 4 x 1 patches, not 2 x 3
    assert logits.shape == (2, 3)
    rng, params, config = make_model(19, positions="learned")
    with pytest.raises(ValueError, match=r"images must have shape \(B, 2, 4, 6\).*got \(2, 2, 8, 2\)"):
        vit_forward(rng.standard_normal((2, 2, 8, 2)), params, config)


# ----------------------------------------------------------------------------------------------------
# Order: without positions a ViT cannot tell where a patch is


@pytest.mark.parametrize("positions", ["learned", "sinusoidal", "none"])
def test_permuting_patches_permutes_patch_outputs_only_without_positions(xp, positions):
    rng, params, config = make_model(9, positions=positions, xp=xp)
    images = random_array(rng, (2, 2, 4, 6), xp=xp)
    perm = np.roll(np.arange(6), 2)
    shuffled = unpatchify(patchify(images, 2)[:, xp.asarray(perm)], 2, 4, 6)           # the same patches, moved
    out = {}
    for name, x in (("original", images), ("shuffled", shuffled)):
        logits, cache = vit_forward(x, params, config)
        out[name] = to_numpy(logits), to_numpy(cache["ln_f"]["xhat"])                # final states (B, N+1, D)
    (logits, states), (logits_s, states_s) = out["original"], out["shuffled"]
    if positions == "none":
        # float64 rounding only: the same sums in another order
        np.testing.assert_allclose(logits_s, logits, rtol=1e-10, atol=1e-12)           # class token unchanged
        np.testing.assert_allclose(states_s[:, 1:], states[:, 1 + perm], rtol=1e-10, atol=1e-12)
    else:
        assert np.abs(logits_s - logits).max() > 1e-6                                 # rounding is ~1e-15
        assert np.abs(states_s[:, 1:] - states[:, 1 + perm]).max() > 1e-6


# ----------------------------------------------------------------------------------------------------
# Attention rollout


@given(seed=seeds, L=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 5))
@example(seed=0, L=1, H=1, T=1)
def test_rollout_rows_are_non_negative_and_sum_to_one(xp, seed, L, H, T):
    rng = np.random.default_rng(seed)
    weights = [softmax_rows(rng, (2, H, T, T), xp) for _ in range(L)]
    rollout = to_numpy(attention_rollout(weights))
    assert rollout.shape == (2, T, T) and (rollout >= 0).all()
    np.testing.assert_allclose(rollout.sum(axis=-1), 1, rtol=1e-12)                 # float64 rounding, L products


def test_identity_attention_rolls_out_to_the_identity(xp):
    eye = xp.asarray(np.broadcast_to(np.eye(5), (2, 3, 5, 5)).copy())
    np.testing.assert_array_equal(to_numpy(attention_rollout([eye, eye, eye])), np.broadcast_to(np.eye(5), (2, 5, 5)))


def test_one_layer_is_the_identity_added_to_the_weights_then_each_row_halved():
    weights = np.array([[[[0.0, 1.0], [1.0, 0.0]]]])                      # every token attends the other
    # W + I = all ones: each row sums to 2, so A = W + I halved (not W, and not W + I unnormalised)
    np.testing.assert_array_equal(attention_rollout([weights])[0], [[0.5, 0.5], [0.5, 0.5]])


def test_rollout_averages_the_heads_so_only_their_mean_matters():
    rng = np.random.default_rng(20)
    a, b, c = (softmax_rows(rng, (2, 1, 4, 4)) for _ in range(3))
    mean = (a + b) / 2                                                     # a probability matrix too
    heads = [np.concatenate([a, b], axis=1), np.concatenate([mean, mean], axis=1)]   # same mean, other heads
    top = np.concatenate([c, c], axis=1)
    two_layers = [attention_rollout([h, top]) for h in heads]
    np.testing.assert_allclose(two_layers[0], two_layers[1], rtol=1e-14)  # float64 rounding of (a + b) / 2
    assert not np.allclose(attention_rollout([np.concatenate([a, a], axis=1), top]), two_layers[0])  # b counts


def test_rollout_of_two_layers_by_hand_multiplies_later_layers_on_the_left():
    layer_1 = np.array([[[[1, 0], [0.5, 0.5]], [[0, 1], [0.5, 0.5]]]])   # heads average to all 0.5
    layer_2 = np.array([[[[1.0, 0], [1, 0]], [[1, 0], [1, 0]]]])
    # A_1 = rownorm([[1.5, .5], [.5, 1.5]]) = [[.75, .25], [.25, .75]];  A_2 = rownorm([[2, 0], [1, 1]])
    # R = A_2 A_1 = [[1, 0], [.5, .5]] [[.75, .25], [.25, .75]]   (A_1 A_2 would give [[.875, .125], ...])
    np.testing.assert_allclose(attention_rollout([layer_1, layer_2])[0], [[0.75, 0.25], [0.5, 0.5]], rtol=1e-15)


def test_rollout_divides_each_row_by_its_own_sum_not_the_keepdims_bug():
    # rows summing to 1 within the accepted rounding (1e-9 < sqrt(eps) = 1.5e-8), but each to another value
    weights = np.array([[[[0.3, 0.7 + 4e-9], [0.5 - 6e-9, 0.5]]]])
    rows = attention_rollout([weights])[0].sum(axis=-1)
    assert np.abs(rows - 1).max() < 1e-15                                 # each row by its own sum: 1 to rounding
    a = weights.mean(axis=1)[0] + np.eye(2)
    without_keepdims = a / a.sum(axis=-1)                                  # divides column j by row j's sum
    assert np.abs(without_keepdims.sum(axis=-1) - 1).max() > 1e-10        # so the check above tells them apart


def test_rollout_of_a_model_reads_every_layer_and_keeps_float32(xp):
    rng, params, config = make_model(10, n_layers=3, dtype=np.float32, xp=xp)
    _, cache = vit_forward(random_array(rng, (2, 2, 4, 6), np.float32, xp), params, config)
    weights = attention_weights(cache)
    assert len(weights) == 3 and weights[0].shape == (2, 2, 7, 7)        # (B, heads, N+1, N+1)
    assert all(w is layer["attn"]["attn"]["weights"] for w, layer in zip(weights, cache["layers"]))
    rollout = attention_rollout(weights)
    assert rollout.dtype == np.float32
    np.testing.assert_allclose(to_numpy(rollout).sum(axis=-1), 1, rtol=1e-5)   # float32 rounding over 3 layers


# ----------------------------------------------------------------------------------------------------
# Data, training, dtypes, devices


def test_same_different_images_put_two_patterns_in_noise_with_balanced_labels():
    images, labels, marked = same_different_images(400, np.random.default_rng(11), noise=0.0)
    assert images.shape == (400, 1, 16, 16) and images.dtype == np.float32
    patches = patchify(images, 4)                                         # (n, 16, 16)
    first, second = patches[np.arange(400), marked[:, 0]], patches[np.arange(400), marked[:, 1]]
    assert (np.abs(first) == 1).all() and (np.abs(second) == 1).all()
    np.testing.assert_array_equal((first == second).all(axis=1), labels == 1)
    assert np.count_nonzero(patches.any(axis=2), axis=1).max() == 2       # nothing else without noise
    assert 150 < labels.sum() < 250                                       # balanced: chance is 50 %
    # one marked patch alone says nothing: in both classes each pixel is +1 half the time (1600+ draws
    # per class and patch, standard deviation 0.0125: 0.44 .. 0.56 is 4.8 of them)
    for label in (0, 1):
        for pattern in (first, second):
            assert 0.44 < (pattern[labels == label] > 0).mean() < 0.56


def test_demo_trains_far_above_chance_and_rollout_finds_the_marked_patches():
    # --quick: 400 steps; the demo asserts held-out accuracy >= 0.80 (chance 0.5) and that both marked
    # patches get more rollout mass than the average patch in > 90 % of test images
    result = run_demo("vit.py", "--quick", timeout=180)
    assert "held-out accuracy" in result.stdout and "rollout:" in result.stdout


def test_vit_py_draws_nothing_its_figure_is_made_by_make_figures():
    source = (ROOT / "vit.py").read_text()
    assert "matplotlib" not in source and "savefig" not in source
    assert "def vit_rollout(path, quick=False)" in (ROOT / "figures" / "make_figures.py").read_text()


def test_the_schedule_never_takes_a_step_at_learning_rate_zero(monkeypatch):
    seen, real = [], vit.lr_schedule

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(vit, "lr_schedule", spy)
    vit.train_same_different(3, batch=4)
    assert len(seen) == 3 and min(seen) > 0


def test_float32_stays_float32(xp):
    for positions in ("learned", "sinusoidal"):
        rng, params, config = make_model(12, positions=positions, dtype=np.float32, xp=xp)
        images = random_array(rng, (2, 2, 4, 6), dtype=np.float32, xp=xp)
        logits, cache = vit_forward(images, params, config)
        dimages, grads = vit_backward(xp.ones_like(logits), cache)
        assert logits.dtype == dimages.dtype == np.float32
        assert all(g.dtype == np.float32 for g in tree_leaves(grads))


def test_numpy_and_the_array_module_agree(xp):
    results = []
    for module in (np, xp):
        rng, params, config = make_model(13, pool="mean", xp=module)
        logits, cache = vit_forward(random_array(rng, (2, 2, 4, 6), xp=module), params, config)
        dimages, grads = vit_backward(module.asarray(rng.standard_normal(logits.shape)), cache)
        results.append([to_numpy(a) for a in [logits, dimages, *tree_leaves(grads)]])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)      # same math, library summation orders


def test_inputs_and_params_are_never_modified(xp):
    rng, params, config = make_model(15, xp=xp)
    images = random_array(rng, (2, 2, 4, 6), xp=xp)
    before = [to_numpy(a).copy() for a in [images, *tree_leaves(params)]]
    logits, cache = vit_forward(images, params, config)
    dlogits = random_like(logits, rng)
    dlogits_before = to_numpy(dlogits).copy()
    vit_backward(dlogits, cache)
    attention_rollout(attention_weights(cache))
    for a, b in zip([images, *tree_leaves(params)], before):
        np.testing.assert_array_equal(to_numpy(a), b)
    np.testing.assert_array_equal(to_numpy(dlogits), dlogits_before)


# ----------------------------------------------------------------------------------------------------
# Every wrong call is refused, naming the argument, what it got and what it needs


BASE = {"image_shape": (2, 4, 6), "P": 2, "D": 8, "n_heads": 2, "F": 12, "n_layers": 2, "n_classes": 3}


@pytest.mark.parametrize("change, error, message", [
    ({"depth": 2}, ValueError, r"unknown fields \['depth'\]"),
    ({"D": None}, ValueError, r"config\['D'\] must be an integer >= 1, got None"),
    ({"D": 0}, ValueError, r"config\['D'\] must be an integer >= 1, got 0"),
    ({"P": 0}, ValueError, r"config\['P'\] must be an integer >= 1, got 0"),
    ({"n_layers": 0}, ValueError, r"config\['n_layers'\] must be an integer >= 1, got 0"),
    ({"n_classes": 0}, ValueError, r"config\['n_classes'\] must be an integer >= 1, got 0"),
    ({"image_shape": (2, 0, 6)}, ValueError, r"config\['image_shape'\] H must be an integer >= 1, got 0"),
    ({"image_shape": (4, 6)}, ValueError, r"config\['image_shape'\] must be \(C, H, W\), got \(4, 6\)"),
    ({"image_shape": (2, 5, 6)}, ValueError, r"H and W multiples of config\['P'\] = 2, got \(2, 5, 6\)"),
    ({"positions": None}, ValueError,
     r"config\['positions'\] must be one of \('learned', 'sinusoidal', 'none'\), got None"),
    ({"positions": "rope"}, ValueError, r"config\['positions'\] must be one of .*got 'rope'"),
    ({"pool": "max"}, ValueError, r"config\['pool'\] must be one of \('cls', 'mean'\), got 'max'"),
    ({"n_heads": 3}, ValueError, r"config\['D'\] = 8 must be divisible by config\['n_heads'\] = 3"),
    ({"D": 6, "positions": "sinusoidal"}, ValueError,
     r"config\['D'\] must be a multiple of 4 for positions 'sinusoidal'"),
])
def test_bad_configs_are_refused_by_field(change, error, message):
    config = {**BASE, **change}
    with pytest.raises(error, match=message):
        check_config(config)
    with pytest.raises(error, match=message):
        init_vit(config, np.random.default_rng(0))


def test_a_config_that_lacks_a_required_field_or_is_not_a_dict_is_refused():
    with pytest.raises(ValueError, match=r"lacks \['n_classes'\]"):
        check_config({key: value for key, value in BASE.items() if key != "n_classes"})
    with pytest.raises(TypeError, match="config must be a dict, got list"):
        check_config([BASE])


@pytest.mark.parametrize("rng", [0, np.random.RandomState(0), None])
def test_init_and_the_task_refuse_an_rng_that_is_not_a_generator(rng):
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator"):
        init_vit(BASE, rng)
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator"):
        same_different_images(4, rng)


def spoil(params, where):
    """A copy of params with one mistake; returns it and the message the forward must give."""
    bad = tree_map(lambda p: p, params)                                    # a fresh tree, the same arrays
    if where == "missing":
        del bad["head"]["b"]
        return bad, r"params\['head'\] must have keys \['W', 'b'\]: missing \['b'\]"
    if where == "extra":
        bad["ln_f"]["scale"] = bad["ln_f"]["gamma"]
        return bad, r"params\['ln_f'\] must have keys .*extra \['scale'\]"
    if where == "shape":
        bad["layers"][1]["ff"]["W_1"] = bad["layers"][1]["ff"]["W_1"][:, :5]
        return bad, r"params\['layers'\]\[1\]\['ff'\]\['W_1'\] must be a float64 array of shape \(8, 12\), got .*\(8, 5\)"
    if where == "layers":
        bad["layers"] = bad["layers"][:1]
        return bad, r"params\['layers'\] must be a list of length 2, got length 1"
    if where == "dtype":
        bad["cls"] = bad["cls"].astype(np.float32)
        return bad, r"params\['[a-z_]+'\].* must be a float32 array"  # the first leaf (cls) sets the dtype
    raise AssertionError(where)


@pytest.mark.parametrize("where", ["missing", "extra", "shape", "layers", "dtype"])
def test_a_params_tree_that_does_not_match_its_config_is_refused_by_path(where):
    rng, params, config = make_model(21)
    bad, message = spoil(params, where)
    with pytest.raises(ValueError, match=message):
        vit_forward(rng.standard_normal((2, 2, 4, 6)), bad, config)


@pytest.mark.parametrize("positions", ["sinusoidal", "none"])
def test_a_learned_table_is_refused_when_positions_are_not_learned(positions):
    rng, params, config = make_model(22)                                   # built with a 'pos' table
    with pytest.raises(ValueError, match=r"params must have keys .*extra \['pos'\]"):
        vit_forward(rng.standard_normal((2, 2, 4, 6)), params, {**config, "positions": positions})


@given(images=spoiled(np.ones((2, 2, 4, 6))))
@example(images=np.ones((0, 2, 4, 6)))                                   # an empty batch
def test_any_images_give_a_clear_error_or_logits_whose_backward_works(images):
    _, params, config = make_model(25)
    try:
        logits, cache = vit_forward(images, params, config)
    except (ValueError, TypeError) as error:
        assert str(error).startswith("images must"), error
        return
    dimages, _ = vit_backward(np.ones_like(logits), cache)
    assert dimages.shape == images.shape
    assert attention_rollout(attention_weights(cache)).shape == (len(images), 7, 7)


def test_bad_images_are_refused():
    rng, params, config = make_model(14)
    good = rng.standard_normal((2, 2, 4, 6))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 2, 4, 6\).*got \(2, 4, 6\)"):
        vit_forward(good[0], params, config)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 2, 4, 6\).*got \(2, 3, 4, 6\)"):
        vit_forward(rng.standard_normal((2, 3, 4, 6)), params, config)
    with pytest.raises(ValueError, match=r"multiples of P = 2\), got \(2, 2, 5, 6\)"):
        vit_forward(rng.standard_normal((2, 2, 5, 6)), params, config)
    with pytest.raises(TypeError, match="images must be a floating-point array, got int64"):
        vit_forward(good.astype(np.int64), params, config)
    with pytest.raises(TypeError, match="images must have dtype float64, the params', got float32"):
        vit_forward(good.astype(np.float32), params, config)                 # would be silently upcast
    with pytest.raises(ValueError, match=r"images must have H and W multiples of P = 2, got \(2, 2, 5, 6\)"):
        patchify(rng.standard_normal((2, 2, 5, 6)), 2)
    with pytest.raises(ValueError, match="P must be an integer >= 1, got 0"):
        patchify(good, 0)
    with pytest.raises(ValueError, match=r"patches must have shape \(B, 4, C\*4\)"):
        unpatchify(patchify(good, 2), 2, 4, 4)
    with pytest.raises(ValueError, match="D must be a positive multiple of 4"):
        sincos_2d_positions(2, 2, 6)


def test_a_wrong_upstream_gradient_or_cache_is_refused():
    rng, params, config = make_model(23)
    logits, cache = vit_forward(rng.standard_normal((2, 2, 4, 6)), params, config)
    with pytest.raises(ValueError, match=r"dlogits must have shape \(2, 3\) \(the forward output's\), got \(1, 3\)"):
        vit_backward(logits[:1], cache)
    with pytest.raises(TypeError, match=r"dlogits must have dtype float64 \(the forward's\), got float32"):
        vit_backward(logits.astype(np.float32), cache)
    with pytest.raises(TypeError, match=r"cache must be the dict vit_forward returned .*got keys \['W', 'pool'"):
        vit_backward(logits, cache["head"])
    with pytest.raises(TypeError, match=r"cache must be the dict head_forward returned"):
        head_backward(logits, cache)
    with pytest.raises(TypeError, match=r"cache must be the dict patch_embed_forward returned"):
        patch_embed_backward(logits, cache["head"])
    with pytest.raises(TypeError, match=r"cache must be the dict vit_forward returned .*got tuple"):
        attention_weights((logits, cache))


def test_rollout_refuses_weights_that_are_not_attention_probabilities():
    rng = np.random.default_rng(24)
    good = softmax_rows(rng, (1, 2, 3, 3))
    negative = good.copy()
    negative[0, 0, 0] = [-0.5, 1.0, 0.5]                                   # still sums to 1
    with pytest.raises(ValueError, match=r"weights\[1\] must be attention probabilities .*smallest entry -0.5"):
        attention_rollout([good, negative])
    with pytest.raises(ValueError, match=r"weights\[0\] must be attention probabilities .*off 1 by 1"):
        attention_rollout([2 * good])
    with pytest.raises(ValueError, match=r"off 1 by 0.001"):
        attention_rollout([good.astype(np.float32) * np.float32(1.001)])   # beyond float32's sqrt(eps) = 3.5e-4
    attention_rollout([good.astype(np.float32) * np.float32(1 + 1e-5)])  # float32 rounding of a long row: fine
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape \(B, heads, N\+1, N\+1\) = \(1, 2, 3, 3\)"):
        attention_rollout([good, softmax_rows(rng, (1, 2, 3, 4))])
    with pytest.raises(TypeError, match=r"weights\[1\] must be a floating-point array like weights\[0\]"):
        attention_rollout([good, good.astype(np.float32)])
    with pytest.raises(ValueError, match="weights must be a non-empty list"):
        attention_rollout([])
    with pytest.raises(ValueError, match="weights must be a non-empty list"):
        attention_rollout(good)
