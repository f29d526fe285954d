"""Sink-to-the-front and its variants: the pure permutation functions, and the LVLM with a
visual-token policy against transformers fed with visual tokens rearranged by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import vitsink_jax as vj
from conftest import assert_close, build, llava_config, save, t2n
from test_lvlm import prompt_with_images
from vitsink_jax.sinks.fuse import (VisualTokenPolicy, arrange_visual_tokens, keep_mask,
                                    permute_tokens, shift_positions)

MASK = np.array([[0, 1, 0, 0, 1, 0],
                 [1, 0, 0, 0, 0, 0],
                 [0, 0, 0, 0, 0, 0]], bool)


@pytest.mark.parametrize("order,select,perm,kept", [
    ("none", "all", [[0, 1, 2, 3, 4, 5]] * 3, [[1] * 6] * 3),
    ("front", "all", [[1, 4, 0, 2, 3, 5], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]], [[1] * 6] * 3),
    ("end", "all", [[0, 2, 3, 5, 1, 4], [1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 4, 5]], [[1] * 6] * 3),
    ("none", "sinks", [[1, 4, 0, 2, 3, 5], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]],
     [[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [0] * 6]),
    ("front", "nonsinks", [[0, 2, 3, 5, 1, 4], [1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 4, 5]],
     [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1] * 6]),
])
def test_arrangement_on_known_masks(order, select, perm, kept):
    p, k = jax.jit(arrange_visual_tokens, static_argnums=(1, 2))(jnp.asarray(MASK), order, select)
    np.testing.assert_array_equal(p, perm)
    np.testing.assert_array_equal(k, np.asarray(kept, bool))
    pv, kv = jax.vmap(lambda m: arrange_visual_tokens(m[None], order, select))(jnp.asarray(MASK))
    np.testing.assert_array_equal(pv[:, 0], perm)
    np.testing.assert_array_equal(kv[:, 0], np.asarray(kept, bool))


def test_permutation_is_stable_and_reversible(rng):
    mask = rng.random((4, 50)) < 0.1
    perm, _ = arrange_visual_tokens(jnp.asarray(mask), "front")
    for row, m in zip(np.asarray(perm), mask):
        n = int(m.sum())
        assert m[row[:n]].all() and not m[row[n:]].any()
        assert (np.diff(row[:n]) > 0).all() and (np.diff(row[n:]) > 0).all()  # relative order kept
    x = jnp.asarray(rng.standard_normal((4, 50, 3)))
    y = permute_tokens(x, perm)
    inverse = jnp.argsort(perm, axis=-1)
    np.testing.assert_array_equal(permute_tokens(y, inverse), x)


def test_keep_and_positions():
    np.testing.assert_array_equal(keep_mask(jnp.asarray(MASK[:1]), "nonsinks"), ~MASK[:1])
    pos = jnp.arange(6)[None]
    dropped = jnp.asarray([[0, 1, 1, 0, 0, 1]], bool)
    np.testing.assert_array_equal(shift_positions(pos, dropped), [[0, 1, 1, 1, 2, 3]])


def test_bad_policy_is_named():
    with pytest.raises(ValueError, match="order 'middle'"):
        VisualTokenPolicy(order="middle")
    with pytest.raises(ValueError, match="select 'some'"):
        VisualTokenPolicy(select="some")


# ---------------------------------------------------------------- LVLM against transformers ---

@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    hf = build(transformers.LlavaForConditionalGeneration, llava_config())
    model, params = vj.load_pretrained(save(hf, tmp_path_factory.mktemp("fuse") / "llava"))
    rng = np.random.default_rng(1)
    ids = np.concatenate([prompt_with_images(rng, 1, 16) for _ in range(2)])
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        vis = hf.model.vision_tower(torch.tensor(pixels), output_hidden_states=True)
        selected = vis.hidden_states[hf.config.vision_feature_layer][:, 1:]
        projected = t2n(hf.model.multi_modal_projector(selected))
        embeds = t2n(hf.get_input_embeddings()(torch.tensor(ids)))
    norms = np.linalg.norm(t2n(selected), axis=-1)  # [2, 16]
    top = np.sort(norms.ravel())
    tau = float(top[-5] + top[-6]) / 2              # the 5 largest norms of the batch are sinks
                                                    # (a threshold between norms, not at one)
    sinks = norms >= tau
    assert sinks[0].sum() != sinks[1].sum() and sinks.sum() == 5  # different counts per image
    return dict(hf=hf, model=model, params=params, ids=ids, pixels=pixels, projected=projected,
                embeds=embeds, sinks=sinks, tau=tau)


def _reference_row(d, row, order, select, positions):
    """HF logits for one prompt whose visual tokens were rearranged (and deleted) by hand."""
    sink = d["sinks"][row]
    idx = np.arange(sink.size)
    groups = {"none": [idx], "front": [idx[sink], idx[~sink]], "end": [idx[~sink], idx[sink]]}[order]
    keep = {"all": np.ones_like(sink), "sinks": sink, "nonsinks": ~sink}[select]
    new = np.concatenate([g[keep[g]] for g in groups])
    ids, emb = d["ids"][row], d["embeds"][row]
    slots = np.flatnonzero(ids == 99)
    before, after = emb[:slots[0]], emb[slots[-1] + 1:]
    seq = np.concatenate([before, d["projected"][row][new], after])
    pos = np.arange(len(seq))
    if positions == "original":
        pos = np.concatenate([np.arange(len(before)), slots[new], np.arange(slots[-1] + 1, len(emb))])
    with torch.no_grad():
        out = d["hf"](inputs_embeds=torch.tensor(seq[None]), position_ids=torch.tensor(pos[None]))
    kept_slots = np.concatenate([np.arange(len(before)), slots[:len(new)],
                                 np.arange(slots[-1] + 1, len(emb))])
    return t2n(out.logits)[0], kept_slots


@pytest.mark.parametrize("order,select,positions", [
    ("front", "all", "sequential"),   # the paper's sink-to-the-front
    ("end", "all", "original"),
    ("front", "sinks", "sequential"),  # Finding 5: sink-only input, tokens deleted
    ("none", "nonsinks", "sequential"),
    ("front", "nonsinks", "original"),
    ("front", "sinks", "family"),      # the default: sequential for LLaVA's 1-D RoPE
])
def test_policy_matches_transformers_on_rearranged_inputs(llava, order, select, positions):
    d = llava
    policy = VisualTokenPolicy(order, select, positions, vj.SinkRule("threshold", tau=d["tau"]))
    model = d["model"].clone(visual_tokens=policy)
    if positions == "family":
        positions = "sequential"
        assert model.policy.positions == positions
    fwd = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x, output_vision=True))
    out = fwd(d["params"], jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]))
    np.testing.assert_array_equal(out.visual_arrangement.sink_mask, d["sinks"])
    for row in range(2):
        ref, kept_slots = _reference_row(d, row, order, select, positions)
        assert_close(np.asarray(out.logits[row])[kept_slots], ref, what=f"row {row} logits")


def test_stock_policy_keeps_stock_logits(llava):
    d = llava
    stock = d["model"].apply({"params": d["params"]}, jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]))
    with torch.no_grad():
        ref = d["hf"](input_ids=torch.tensor(d["ids"]), pixel_values=torch.tensor(d["pixels"]))
    assert_close(stock.logits, t2n(ref.logits), what="stock logits")
    moved = d["model"].clone(visual_tokens=VisualTokenPolicy("front")).apply(
        {"params": d["params"]}, jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]))
    # tau = 100 finds no sinks in a random tiny tower: front is then the identity
    np.testing.assert_array_equal(moved.logits, stock.logits)


def test_no_recompile_per_sink_count(llava):
    d = llava
    policy = VisualTokenPolicy("front", rule=vj.SinkRule("threshold", tau=d["tau"]))
    model = d["model"].clone(visual_tokens=policy)
    fwd = jax.jit(lambda p, i, x: model.apply({"params": p}, i, x).logits)
    fwd(d["params"], jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]))
    fwd(d["params"], jnp.asarray(d["ids"]), jnp.asarray(d["pixels"][::-1] * 3.0))
    assert fwd._cache_size() == 1
