"""The attention implementations (``attention_impl``: models.attention.ATTENTION_IMPLS) against
the explicit einsum - softmax - einsum path, outputs and gradients, under each mask the models
build: causal with GQA and left / right padding, a sliding window with Gemma 3's image blocks,
the vision towers' bidirectional attention (none, or padding only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitsink_jax.models import attention
from vitsink_jax.models.attention import dot_product_attention, make_attention_mask

B, T, D = 2, 20, 16


def case(name: str, rng):
    """(q [B, T, H, D], k, v [B, T, K, D], mask or None, real [B, T] 1 at queries some token reads)."""
    heads, kv_heads = (4, 2) if name.startswith("causal") or name == "window_blocks" else (4, 4)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, h, D)), jnp.float32)
               for h in (heads, kv_heads, kv_heads))
    pad = np.ones((B, T), np.int32)
    pad[1, :5] = 0                                          # left padding
    pad[0, -3:] = 0                                         # right padding
    blocks = np.full((B, T), -1, np.int32)
    blocks[:, 6:11] = 0                                     # an image, bidirectional within
    mask = {"causal_gqa_padding": lambda: make_attention_mask(jnp.asarray(pad), T, T, causal=True),
            "window_blocks": lambda: make_attention_mask(jnp.asarray(pad), T, T, causal=True, window=4,
                                                         blocks=jnp.asarray(blocks)),
            "bidirectional_vit": lambda: None,
            "vit_padding": lambda: make_attention_mask(jnp.asarray(pad), T, T, causal=False)}[name]()
    return q, k, v, mask, (np.ones((B, T)) if mask is None else pad)


CASES = ("causal_gqa_padding", "window_blocks", "bidirectional_vit", "vit_padding")


def outputs_and_grads(impl, q, k, v, mask, real):
    """(out [B, T, H, D] at the real queries, gradients of a weighted sum of it in q, k, v)."""
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32) * real[:, :, None, None]

    def f(q, k, v):
        out, weights = dot_product_attention(q, k, v, mask, impl=impl)
        assert (weights is None) == (impl != "explicit")
        return jnp.sum(out * w), out * real[:, :, None, None]
    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


@pytest.mark.parametrize("name", CASES)
def test_xla_attention_equals_the_explicit_path(name, rng):
    """jax.nn.dot_product_attention's XLA path (the default): outputs and gradients equal."""
    inputs = case(name, rng)
    want, want_grads = outputs_and_grads("explicit", *inputs)
    got, got_grads = outputs_and_grads("xla", *inputs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~1 min: the Pallas interpreter runs the kernels block by block
def test_splash_attention_equals_the_explicit_path_in_interpret_mode(rng):
    """The TPU splash-attention kernels (forward, dq, dkv), run by Pallas' interpreter on CPU
    under each mask (T = 20 padded to one 128 block): outputs at the real queries and
    gradients equal the explicit path's."""
    for name in CASES:
        inputs = case(name, rng)
        want, want_grads = outputs_and_grads("explicit", *inputs)
        got, got_grads = outputs_and_grads("splash", *inputs)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
        for a, b in zip(got_grads, want_grads):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_cudnn_is_asked_of_jax_and_unknown_impls_are_refused(monkeypatch, rng):
    """"cudnn" calls jax.nn.dot_product_attention with implementation="cudnn" (cuDNN's flash
    kernel: GPU only, not run here); a name outside ATTENTION_IMPLS is refused naming them, and
    no implementation but "explicit" takes an adjustment of the probabilities (VAR)."""
    q, k, v, mask, _ = case("causal_gqa_padding", rng)
    asked = []
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *a, implementation=None, **kw: asked.append(implementation) or a[0])
    dot_product_attention(q, k, v, mask, impl="cudnn")
    assert asked == ["cudnn"]
    with pytest.raises(ValueError, match="not one of .*'xla', 'cudnn', 'splash', 'explicit'"):
        dot_product_attention(q, k, v, mask, impl="flash")
    with pytest.raises(ValueError, match="cannot adjust"):
        dot_product_attention(q, k, v, mask, adjust=lambda p: p, impl="xla")
    assert attention.ATTENTION_IMPLS[0] == attention.Attention.impl == "xla"
