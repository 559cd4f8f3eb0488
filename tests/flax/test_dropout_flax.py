"""The Flax backend's dropout (``nezha_zoo.flax.layers.Dropout``): per-element masks from 16-bit draws (issue #23)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nezha_zoo.flax.layers import DROPOUT_BITS, Dropout, _random_uint16

pytestmark = [pytest.mark.flax]

KEYS = {
    "raw threefry": lambda seed: jax.random.PRNGKey(seed),
    "threefry2x32": lambda seed: jax.random.key(seed, impl="threefry2x32"),
    "rbg": lambda seed: jax.random.key(seed, impl="rbg"),
}


def apply(rate: float, x, key, deterministic: bool = False):
    return np.asarray(Dropout(rate).apply({}, x, deterministic=deterministic, rngs={"dropout": key}))


@pytest.mark.parametrize("kind", sorted(KEYS))
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_fraction_and_kept_values(kind, rate):
    x = jnp.ones((64, 12, 16, 16), jnp.float32)
    y = apply(rate, x, KEYS[kind](0))
    assert y.shape == x.shape and y.dtype == np.float32
    kept = y != 0
    # kept elements are scaled by 1 / (1 - rate), as torch and flax.linen do; dropped ones are 0
    np.testing.assert_array_equal(y[kept], np.float32(1.0) / np.float32(1.0 - rate))
    keep = 1.0 - round(rate * 2**DROPOUT_BITS) / 2**DROPOUT_BITS  # the rounded keep probability
    for part in (kept, kept[..., 0::2], kept[..., 1::2], kept[0], kept[-1]):  # both 16-bit halves, all rows
        bound = 5 * np.sqrt(keep * (1.0 - keep) / part.size)
        assert abs(part.mean() - keep) < bound, (part.mean(), keep, bound)


def test_mask_is_per_element_and_follows_the_key():
    x = jnp.ones((2, 3, 16, 16), jnp.float32)  # (B, heads, Lq, Lk): no mask shared over batch or heads
    a = apply(0.5, x, KEYS["rbg"](1)) != 0
    assert not (a[0] == a[1]).all() and not (a[:, 0] == a[:, 1]).all()
    assert not (a[..., 0::2] == a[..., 1::2]).all()  # the two halves of a random word differ
    np.testing.assert_array_equal(apply(0.5, x, KEYS["rbg"](1)) != 0, a)  # same key, same mask
    assert (apply(0.5, x, KEYS["rbg"](2)) != 0).tolist() != a.tolist()


def test_random_uint16_is_uniform():
    # an odd element count: the last 32-bit word is half used
    bits = np.asarray(_random_uint16(jax.random.PRNGKey(3), (1001, 257)))
    assert bits.shape == (1001, 257) and bits.dtype == np.uint16
    n = bits.size
    for byte in (bits >> 8, bits & 0xFF):  # each byte uniform on 0..255: mean 127.5, sd 73.9
        assert abs(byte.mean() - 127.5) < 5 * 73.9 / np.sqrt(n)
    top = np.bincount((bits >> 12).ravel(), minlength=16)  # 16 equal bins of the high nibble
    assert abs(top - n / 16).max() < 5 * np.sqrt(n / 16)


def test_eval_mode_and_edge_rates():
    x = jnp.arange(1.0, 13.0).reshape(3, 4)
    key = KEYS["rbg"](0)
    np.testing.assert_array_equal(apply(0.3, x, key, deterministic=True), np.asarray(x))  # eval: identity
    np.testing.assert_array_equal(apply(0.0, x, key), np.asarray(x))
    np.testing.assert_array_equal(apply(1.0, x, key), np.zeros((3, 4), np.float32))
    tiny = 2.0**-18  # rounds to no drop: every element kept, scaled by 1 / (1 - rate)
    np.testing.assert_allclose(apply(tiny, x, key), np.asarray(x) / (1.0 - tiny), rtol=1e-7)
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\]"):
        apply(1.5, x, key)
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\]"):
        apply(-0.1, x, key, deterministic=True)
