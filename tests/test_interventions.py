"""Sink interventions against hand-computed references: FastV / sink-aware pruning against
transformers run on the kept tokens, VAR against a loop over (row, head, query), both off =
stock."""

import copy
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

import vitsink_jax as vj
from conftest import (IMAGE_TOKEN, assert_close, build, jit_apply, llama_config, llava_config, phi3_config,
                      phi_config, random_ids, save, t2n)
from vitsink_jax.sinks.detect import sink_mask, token_norms
from vitsink_jax.interventions import AttentionRedistribution, Interventions, TokenPruning
from vitsink_jax.interventions.var import redistribute

VIS = slice(3, 15)  # 12 visual slots in a 20-token row


def _visual_rows():
    """(ids [2, 20], visual slots, ViT sinks) of the decoder-only intervention tests."""
    ids = random_ids(np.random.default_rng(1), 2, 20)
    visual = np.zeros(ids.shape, bool)
    visual[:, VIS] = True
    sinks = np.zeros(ids.shape, bool)
    sinks[0, [5, 9]] = sinks[1, 4] = True
    return ids, visual, sinks


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = build(transformers.LlamaForCausalLM, llama_config(num_hidden_layers=4))
    model, params = vj.load_pretrained(save(hf, tmp_path_factory.mktemp("llama")))
    return (hf, model, params, *_visual_rows())


def run(model, params, ids, visual, sinks, **iv):
    return jit_apply(model, {"params": params}, jnp.asarray(ids), interventions=Interventions(**iv),
                     visual_mask=jnp.asarray(visual), sink_mask=jnp.asarray(sinks), num_visual=12,
                     output_attentions=True)


def fastv_reference(hf, ids, visual, sinks, layer, ratio, keep_sinks, score="last", debias=False):
    """transformers: layers < K on every token; the kept tokens are picked from layer K-1's
    attention, score "last" as FastV's code (modeling_llama.py: ``torch.mean(attention, dim=1)``
    over heads, then the last query's row ``[-1]``) or "mean" (also averaged over the queries,
    the paper's text); ``debias``: the score divided by the exponential trend fitted to the
    row's visual tokens (np.polyfit of log score on the visual index); layers >= K run on them
    alone with their original positions. Returns (kept indices per row, logits at the kept
    tokens)."""
    with torch.no_grad():
        full = hf(torch.tensor(ids), output_attentions=True, output_hidden_states=True)
        heads = t2n(full.attentions[layer - 1]).mean(1)                      # [B, T, T]
        received = heads[:, -1] if score == "last" else heads.mean(1)        # [B, T]
        if debias:
            received = received.astype(np.float64).copy()
            for b in range(ids.shape[0]):
                i = np.arange(visual[b].sum())
                trend = np.exp(np.polyval(np.polyfit(i, np.log(received[b, visual[b]]), 1), i))
                received[b, visual[b]] /= trend
        n_drop = int(ratio * visual[0].sum())
        rest = copy.deepcopy(hf)
        rest.model.layers = rest.model.layers[layer:]
        if getattr(rest.config, "layer_types", None):  # Gemma 3: the later layers' kinds
            rest.config.layer_types = rest.config.layer_types[layer:]
            rest.config.num_hidden_layers -= layer
        kept, logits = [], []
        for b in range(ids.shape[0]):
            order = [i for i in np.argsort(received[b], kind="stable")
                     if visual[b, i] and not (keep_sinks and sinks[b, i])]
            keep = np.setdiff1d(np.arange(ids.shape[1]), order[:n_drop])
            h = full.hidden_states[layer][b:b + 1, keep]
            # no cache (the kept layers keep their indices); an explicit padding mask, else
            # transformers reads the gaps in the positions as packed sequences
            out = rest(inputs_embeds=h, position_ids=torch.tensor(keep)[None], use_cache=False,
                       attention_mask=torch.ones((1, len(keep)), dtype=torch.long))
            kept.append(keep)
            logits.append(t2n(out.logits[0]))
    return np.stack(kept), np.stack(logits)


@pytest.mark.parametrize("keep_sinks,score", [(False, "last"), (True, "last"), (False, "mean"),
                                              (True, "mean"), (False, "debias"), (True, "debias")])
def test_pruning_equals_transformers_on_the_kept_tokens(llama, keep_sinks, score):
    """FastV's code's rule (the last query, the default), the paper's mean over queries and
    the last query's score debiased (arXiv 2508.17807, the recency trend fitted per row)."""
    hf, model, params, ids, visual, sinks = llama
    debias = score == "debias"
    kept, ref = fastv_reference(hf, ids, visual, sinks, 2, 0.5, keep_sinks, "last" if debias else score,
                                debias)
    if score != "mean":  # the rules really keep other tokens here
        other = fastv_reference(hf, ids, visual, sinks, 2, 0.5, keep_sinks, "mean" if score == "last" else "last")
        assert not np.array_equal(kept, other[0])
    prune = (TokenPruning(2, 0.5, keep_sinks, score) if score == "mean" else
             TokenPruning(2, 0.5, keep_sinks, debias="fit") if debias else TokenPruning(2, 0.5, keep_sinks))
    out = run(model, params, ids, visual, sinks, prune=prune)
    ours = np.take_along_axis(np.asarray(out.logits), kept[..., None], 1)
    assert_close(ours, ref, what="logits at the kept tokens")
    assert out.attentions[-1].shape[-1] == 20 - 6  # the later layers really ran on 14 tokens
    if keep_sinks:
        assert all(np.isin(np.flatnonzero(sinks[b]), kept[b]).all() for b in range(2))


def test_last_query_of_left_and_right_padded_rows():
    """score "last" reads the last real query's row whatever the padding side (hand-built
    attention: query q pays everything to key q); "mean" averages the real queries'."""
    from vitsink_jax.interventions.pruning import attention_received

    w = jnp.broadcast_to(jnp.eye(4), (2, 2, 4, 4))                     # [B, H, T, T]
    mask = jnp.asarray([[0, 0, 1, 1], [1, 1, 0, 0]])                   # left pad, right pad
    np.testing.assert_array_equal(attention_received(w, mask), [[0, 0, 0, 1], [0, 1, 0, 0]])
    np.testing.assert_array_equal(attention_received(w, mask, "mean"),
                                  [[0, 0, .5, .5], [.5, .5, 0, 0]])


def test_attention_debiasing_hand_computed():
    """The recency trend of [2, 1, 4, 2] at visual indices 0..3: b = cov(i, log s) / var(i) =
    ln 2 / 5, so the debiased scores are s x 2^(-i / 5); a pure exponential [1, 2, 4, 8]
    becomes flat; padding scores 0 and leaves the fit; "weights" multiplies by the authors'
    per-position weights. The ranking changes: raw FastV drops slot 1, the weights drop slot 4."""
    from vitsink_jax.interventions.pruning import debiased_scores, keep_indices, recency_slope

    scores = jnp.asarray([[.5, 2., 1., 4., 2., .3], [.5, 1., 2., 4., 8., .3]])
    visual = jnp.asarray([[False, True, True, True, True, False]] * 2)
    np.testing.assert_allclose(recency_slope(scores, visual), [np.log(2) / 5, np.log(2)], rtol=1e-5)
    out = debiased_scores(scores, visual)
    np.testing.assert_allclose(out[0], [.5, 2, 2 ** -.2, 4 * 2 ** -.4, 2 * 2 ** -.6, .3], rtol=1e-5)
    np.testing.assert_allclose(out[1], [.5, 1, 1, 1, 1, .3], rtol=1e-5)
    padding = jnp.asarray([[False, False, True, False, False, False]] * 2)
    padded = debiased_scores(scores, visual, padding=padding)
    # row 1 without its index-1 token: log s = [0, -, 2 ln 2, 3 ln 2] at i = [0, 2, 3], b = ln 2
    np.testing.assert_allclose(padded[1], [.5, 1, 0, 1, 1, .3], rtol=1e-5)
    weighted = debiased_scores(scores, visual, "weights", (1., .5, .25, .125))
    np.testing.assert_allclose(weighted[0], [.5, 2, .5, 1, .25, .3], rtol=1e-6)
    np.testing.assert_array_equal(keep_indices(scores, visual, None, 1)[0], [0, 1, 3, 4, 5])
    np.testing.assert_array_equal(keep_indices(weighted, visual, None, 1)[0], [0, 1, 2, 3, 5])
    with pytest.raises(ValueError, match="debias"):
        TokenPruning(debias="weights")  # the weights are needed


@pytest.mark.slow
def test_scoring_prunes_from_the_prompt_as_generation_does(tmp_path):
    """A likelihood row (prompt + candidate) ranks the visual tokens by the prompt's last token,
    as generation's prefill of the prompt: the prompt's logits equal the prompt-only forward's.
    Without the prompt mask the candidate's last token ranks (other tokens kept here).
    eval_lib.prompt_tokens marks the prompt of the scorer's right-padded rows."""
    from vitsink_jax.eval_lib import prompt_tokens

    hf = build(transformers.LlavaForConditionalGeneration, llava_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    n = model.config.num_image_tokens
    prompt = [1, 5, 6] + [IMAGE_TOKEN] * n + [7, 8]
    full = np.array([prompt + [30, 41, 52]] * 2)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 28, 28)), jnp.float32)
    pruned = model.clone(interventions=Interventions(prune=TokenPruning(1, 0.5)))
    targets = np.full(full.shape, -1)
    targets[:, len(prompt) - 1:-1] = full[:, len(prompt):]
    marked = prompt_tokens(jnp.ones(full.shape, jnp.int32), jnp.asarray(targets))
    np.testing.assert_array_equal(marked, np.arange(full.shape[1])[None].repeat(2, 0) < len(prompt))
    alone = jit_apply(pruned, {"params": params}, jnp.asarray(full[:, :len(prompt)]), pixels).logits
    ours = jit_apply(pruned, {"params": params}, jnp.asarray(full), pixels, prompt_mask=marked).logits
    np.testing.assert_allclose(ours[:, :len(prompt)], alone, atol=1e-5)
    unmasked = jit_apply(pruned, {"params": params}, jnp.asarray(full), pixels).logits
    assert not np.allclose(unmasked[:, :len(prompt)], alone, atol=1e-5)
    np.testing.assert_array_equal(prompt_tokens(jnp.asarray([[1, 1, 0]]), jnp.asarray([[-1, -1, -1]])),
                                  [[True, True, False]])  # next-token rows: the whole row


@pytest.mark.slow
def test_pruning_on_phi2_equals_transformers_on_the_kept_tokens(tmp_path):
    """FastV on Phi-2's parallel block (partial rotary, q/k LayerNorm): the same reference."""
    hf = build(transformers.PhiForCausalLM, phi_config(num_hidden_layers=4))
    model, params = vj.load_pretrained(save(hf, tmp_path / "phi"))
    ids, visual, sinks = _visual_rows()
    kept, ref = fastv_reference(hf, ids, visual, sinks, 2, 0.5, True)
    out = run(model, params, ids, visual, sinks, prune=TokenPruning(2, 0.5, True))
    assert_close(np.take_along_axis(np.asarray(out.logits), kept[..., None], 1), ref,
                 what="Phi-2 logits at the kept tokens")


def test_pruning_ratio_zero_and_var_budget_zero_equal_stock(llama):
    _, model, params, ids, visual, sinks = llama
    stock = jit_apply(model, {"params": params}, jnp.asarray(ids)).logits
    for iv in (dict(prune=TokenPruning(2, 0.0)), dict(var=AttentionRedistribution(p=1.0, sinks="vit"))):
        np.testing.assert_allclose(run(model, params, ids, visual, sinks, **iv).logits, stock, atol=1e-5)


def var_loop(w, visual, sinks, p, rho, summ):
    """VAR written as the method states it, one (row, head, query) at a time."""
    out = w.copy()
    for b, h, t in np.ndindex(*w.shape[:3]):
        row = w[b, h, t]
        a = row[visual[b]].sum()
        if not (row[visual[b] & sinks[b]].sum() / (a + 1e-6) <= rho and a >= summ):
            continue
        new = row.copy()
        new[sinks[b]] *= p
        budget = (1 - p) * row[sinks[b]].sum()
        target = visual[b] & ~sinks[b]
        new[target] += budget * new[target] / (new[target].sum() + 1e-8)
        out[b, h, t] = new
    return out


def test_var_matches_the_loop_and_keeps_rows_normalised():
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.full(10, 0.3), size=(2, 3, 5)).astype(np.float32)      # [B, H, T, S]
    visual = np.zeros((2, 10), bool)
    visual[:, 2:8] = True
    sinks = np.zeros((2, 10), bool)
    sinks[:, [0, 3]] = True   # a text sink (BOS-like) and a visual sink
    sinks[1, 6] = True
    got = np.asarray(redistribute(jnp.asarray(w), jnp.asarray(visual), jnp.asarray(sinks),
                                  0.6, 0.5, 0.2))
    ref = var_loop(w, visual, sinks, 0.6, 0.5, 0.2)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert not np.allclose(got, w)                      # some heads were image-centric
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
    per_row = jax.vmap(lambda x, v, s: redistribute(x[None], v[None], s[None], 0.6, 0.5, 0.2)[0])
    np.testing.assert_allclose(per_row(jnp.asarray(w), jnp.asarray(visual), jnp.asarray(sinks)), got,
                               atol=1e-7)


@pytest.mark.parametrize("queries", ["after-image", "all"])
def test_var_inside_the_model_moves_attention_off_the_sinks(llama, queries):
    """The official code changes the queries after the image only (slots 15-19 here); "all"
    the image's queries too."""
    _, model, params, ids, visual, sinks = llama
    var = AttentionRedistribution(p=0.2, rho=1.0, summ=0.0, first_layer=1, skip_last=False,
                                  sinks="vit", queries=queries)
    stock = run(model, params, ids, visual, sinks)
    out = run(model, params, ids, visual, sinks, var=var)
    a, b = np.asarray(stock.attentions[1]), np.asarray(out.attentions[1])  # layer 1: same inputs
    np.testing.assert_allclose(b.sum(-1), 1.0, atol=1e-5)
    sink_share = lambda w: (w * sinks[:, None, None, :]).sum(-1)  # noqa: E731
    assert np.all(sink_share(b)[:, :, 15:] < sink_share(a)[:, :, 15:])
    if queries == "after-image":
        np.testing.assert_allclose(b[:, :, :15], a[:, :, :15], atol=1e-6)
    else:
        assert np.all(sink_share(b)[:, :, 10:15] < sink_share(a)[:, :, 10:15])
    np.testing.assert_allclose(np.asarray(out.attentions[0]), np.asarray(stock.attentions[0]), atol=1e-6)


def test_var_as_the_official_code_hand_computed():
    """One head, keys [BOS (text sink), v0 (visual sink), v1, v2, text], p = 0.6, rho = 0.5,
    summ = 0.2. Query 1 (after the image) pays [.3, .1, .2, .2, .2]: a = .5, s = .1 / .5 = .2,
    image-centric; BOS -> .18, v0 -> .06, budget .4 x .4 = .16 to v1, v2 in ratio .2 : .2.
    Query 0 (an image query) stays. With BOS the only sink (no visual sink) the official code
    leaves the layer alone; without that requirement BOS's budget .12 goes to v0 v1 v2 (1:2:2)."""
    row = [.3, .1, .2, .2, .2]
    w = jnp.asarray([[[row, row]]], jnp.float32)                                  # [1, 1, 2, 5]
    visual = jnp.asarray([[False, True, True, True, False]])
    both, bos = jnp.asarray([[True, True, False, False, False]]), jnp.asarray([[True] + [False] * 4])
    queries = jnp.asarray([[False, True]])
    got = redistribute(w, visual, both, 0.6, 0.5, 0.2, queries, True)[0, 0]
    np.testing.assert_allclose(got, [row, [.18, .06, .28, .28, .2]], atol=1e-6)
    np.testing.assert_allclose(redistribute(w, visual, bos, 0.6, 0.5, 0.2, queries, True)[0, 0], [row, row])
    np.testing.assert_allclose(redistribute(w, visual, bos, 0.6, 0.5, 0.2, queries)[0, 0, 1],
                               [.18, .124, .248, .248, .2], atol=1e-6)


def test_var_prefill_queries_and_sink_dims_found_on_data(tmp_path):
    """queries_after_visual: after each row's last visual token, all in a row without one;
    llm_sink_dims finds a dimension planted as a massive activation at BOS, none without."""
    from vitsink_jax.interventions.var import llm_sink_dims, queries_after_visual

    vis = jnp.asarray([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(queries_after_visual(vis), [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [1] * 5])
    hf = build(transformers.LlavaForConditionalGeneration, llava_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    n = model.config.num_image_tokens
    batch = {"ids": np.array([[1, 5] + [IMAGE_TOKEN] * n + [7, 8]]), "mask": np.ones((1, n + 4), np.int32),
             "pixels": np.random.default_rng(0).normal(size=(1, 3, 28, 28)).astype(np.float32)}
    assert llm_sink_dims(model, params, batch) == ()
    planted = jax.tree_util.tree_map(lambda x: x, params)
    table = planted["language_model"]["model"]["embed_tokens"]["embedding"]
    planted["language_model"]["model"]["embed_tokens"]["embedding"] = table.at[1, 3].set(1e4)
    assert llm_sink_dims(model, planted, batch) == (3,)
    with pytest.raises(ValueError, match="sink_dims"):
        model.clone(interventions=Interventions(var=AttentionRedistribution())).apply(
            {"params": params}, jnp.asarray(batch["ids"]), jnp.asarray(batch["pixels"]))


@pytest.mark.slow
def test_lvlm_pruning_keeps_the_vit_sinks_and_needs_one_image_per_row(tmp_path):
    hf = build(transformers.LlavaForConditionalGeneration, llava_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    n = model.config.num_image_tokens
    ids = np.array([[1, 5, 6] + [IMAGE_TOKEN] * n + [7, 8]] * 2)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 28, 28)), jnp.float32)
    rule = vj.SinkRule("topk", k=3)
    policy = model.clone(visual_tokens=vj.VisualTokenPolicy(rule=rule))
    pruned = policy.clone(interventions=Interventions(prune=TokenPruning(1, 0.75, keep_sinks=True)))
    out = pruned.apply({"params": params}, jnp.asarray(ids), pixels, output_attentions=True,
                       output_vision=True)
    assert out.attentions[-1].shape[-1] == ids.shape[1] - int(0.75 * n)
    sinks = sink_mask(token_norms(out.vision_features), rule)
    inputs = pruned.apply({"params": params}, out.vision_features, None, jnp.asarray(ids) == IMAGE_TOKEN,
                          method=pruned.intervention_inputs)
    np.testing.assert_array_equal(np.asarray(inputs["sink_mask"])[:, 3:3 + n], np.asarray(sinks))
    two = np.array([[1] + [IMAGE_TOKEN] * n + [5] + [IMAGE_TOKEN] * n + [7]])  # 2 images, 1 row
    with pytest.raises(ValueError, match="one image per row"):
        pruned.apply({"params": params}, jnp.asarray(two), pixels)


@pytest.mark.slow
def test_test_time_registers_remove_a_planted_outlier():
    """A tiny CLIP tower with one planted register neuron (layer 0, neuron 10 fires only at the
    token whose position embedding points along dim 0, and writes a huge value into dim 1): the
    neuron search finds it, and moving it into a test-time register removes the outlier."""
    from flax.core import unfreeze

    from vitsink_jax.config import VisionConfig
    from vitsink_jax.interventions import TestTimeRegisters
    from vitsink_jax.interventions.registers import find_register_neurons
    from vitsink_jax.models.dinov2 import Dinov2Tower
    from vitsink_jax.models.vit import VisionTransformer

    c = VisionConfig(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                     num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=7)
    pixels = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 28, 28))
    tower = VisionTransformer(c)
    p = unfreeze(tower.init(jax.random.PRNGKey(0), pixels)["params"])
    token, neuron = 6, 10
    p["embeddings"]["position_embedding"]["embedding"] = \
        p["embeddings"]["position_embedding"]["embedding"].at[token, 0].set(30.0)
    mlp = p["encoder"]["layers_0"]["mlp"]
    mlp["fc1"]["kernel"] = mlp["fc1"]["kernel"].at[:, neuron].set(0.0).at[0, neuron].set(5.0)
    mlp["fc1"]["bias"] = mlp["fc1"]["bias"].at[neuron].set(-8.0)
    mlp["fc2"]["kernel"] = mlp["fc2"]["kernel"].at[neuron].set(0.0).at[neuron, 1].set(30.0)

    out, inter = tower.apply({"params": p}, pixels, output_hidden_states=True, mutable=["intermediates"])
    norms = np.asarray(token_norms(out.hidden_states[-1]))
    assert (np.argmax(norms, 1) == token).all() and norms[:, token].min() > 20 * np.median(norms)
    acts = [inter["intermediates"]["encoder"][f"layers_{i}"]["mlp"]["mlp_activations"][0]
            for i in range(3)]
    (layer, found, _), *_ = find_register_neurons(acts, norms == norms.max(1, keepdims=True), top=3)
    assert (layer, found) == (0, neuron)

    ttr = TestTimeRegisters(neurons=((layer, found),))
    fixed = VisionTransformer(c, test_time_registers=ttr).apply({"params": p}, pixels,
                                                                  output_hidden_states=True)
    norms = np.asarray(token_norms(fixed.hidden_states[-1]))
    assert fixed.hidden_states[-1].shape == out.hidden_states[-1].shape  # the register is dropped
    assert norms.max() < 2 * np.median(norms)
    empty = VisionTransformer(c, test_time_registers=TestTimeRegisters()).apply({"params": p}, pixels)
    np.testing.assert_array_equal(empty.last_hidden_state, out.last_hidden_state)  # no neuron: stock
    d = VisionConfig(model_type="dinov2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, image_size=28, patch_size=7, layerscale_value=0.5)
    dino = Dinov2Tower(d, test_time_registers=ttr)
    out = dino.apply(dino.init(jax.random.PRNGKey(0), pixels), pixels, output_attentions=True)
    assert out.last_hidden_state.shape == (2, 17, 32) and out.attentions[0].shape == (2, 4, 17, 17)


def test_test_time_registers_as_the_authors_code_hand_computed():
    """move_to_registers: the register gets the signed activation of largest magnitude over all
    tokens and the layer's neurons (-7 here), at every neuron; patches 0, CLS kept. The neuron
    search: layers up to highest_layer only, and a dense neuron (>= 0.5 at over half the
    tokens) scores 0 (the authors' sparsity filter)."""
    from vitsink_jax.interventions.registers import find_register_neurons, move_to_registers

    act = jnp.asarray([[[1., 8., 3.], [2., 8., 4.], [-7., 8., 5.], [.5, 8., 0.]]])  # [1, CLS p p reg, 3]
    got = move_to_registers(act, (0, 2), registers=1, prefix=1)[0]
    np.testing.assert_array_equal(got, [[1, 8, 3], [0, 8, 0], [0, 8, 0], [-7, 8, -7]])
    old = move_to_registers(act, (0, 2), registers=1, prefix=1, value="per-neuron-max")[0]
    np.testing.assert_array_equal(old[3], [2, 8, 5])
    layer0 = np.array([[[0, 9, 0], [0, 9, 4], [0, 9, 0], [0, 9, 0]]], np.float32)  # [B, N, F]
    layer1 = np.array([[[0, 0, 0], [20, 0, 0], [0, 0, 0], [0, 0, 0]]], np.float32)
    outliers = np.array([[False, True, False, False]])
    assert find_register_neurons([layer0, layer1], outliers, top=2, highest_layer=0) == [
        (0, 2, 4.0), (0, 0, 0.0)]
    assert find_register_neurons([layer0, layer1], outliers, top=2, sparsity_filter=False) == [
        (1, 0, 20.0), (0, 1, 9.0)]


@pytest.mark.slow
def test_register_search_over_distinct_images_in_chunks_up_to_the_feature_layer(tmp_path):
    """The harness searches distinct images (search_pixels), SEARCH_CHUNK per forward: the same
    neurons as one forward over all of them, none after the feature layer (LLaVA's -2: the
    tower's last layer never writes the features the projector reads)."""
    from vitsink_jax.interventions import registers as reg

    hf = build(transformers.LlavaForConditionalGeneration, llava_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    c = model.config
    pixels = np.random.default_rng(0).normal(size=(reg.SEARCH_CHUNK + 2, 3, 28, 28)).astype(np.float32)
    rule = vj.SinkRule("topk", k=2)
    whole = reg.tower_scores(model, params, pixels, rule)
    layers = c.vision.num_hidden_layers
    assert c.feature_layers == (-2,) and whole[0].shape[0] == layers
    found = reg.register_neurons(model, params, pixels, rule, 5)
    ref = reg.top_register_neurons(*whole, 5, highest_layer=layers - 2)
    assert [f[:2] for f in found] == [r[:2] for r in ref]
    np.testing.assert_allclose([f[2] for f in found], [r[2] for r in ref], rtol=1e-5)
    assert max(layer for layer, _, _ in found) <= layers - 2
    records = [{"image": _png_bytes(v)} for v in (10, 200, 10, 90)]  # 3 distinct images
    assert reg.search_pixels(c, records).shape == (3, 3, 28, 28)


def _png_bytes(value: int) -> bytes:
    """A 28 x 28 grey PNG of ``value``, encoded."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_clip_test_time_register_enters_before_the_pre_layernorm():
    """In the authors' CLIP the zero register joins before ln_pre, so layer 0 reads ln_pre's
    bias there: the tower equals its encoder run on [ln_pre(embeddings), bias]."""
    from flax.core import unfreeze

    from vitsink_jax.config import VisionConfig
    from vitsink_jax.interventions import TestTimeRegisters
    from vitsink_jax.models.tower import Encoder
    from vitsink_jax.models.vit import EncoderLayer, VisionEmbeddings, VisionTransformer

    c = VisionConfig(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7)
    pixels = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 28, 28))
    ttr = TestTimeRegisters(neurons=((0, 3), (1, 5)))
    tower = VisionTransformer(c, test_time_registers=ttr)
    p = unfreeze(tower.init(jax.random.PRNGKey(0), pixels)["params"])
    ln = p["pre_layrnorm"]
    ln["bias"] = jax.random.normal(jax.random.PRNGKey(2), ln["bias"].shape)
    x = VisionEmbeddings(c).apply({"params": p["embeddings"]}, pixels)
    normed = nn.LayerNorm(epsilon=c.layer_norm_eps).apply({"params": ln}, x)
    seq = jnp.concatenate([normed, jnp.broadcast_to(ln["bias"], (2, 1, 32))], 1)
    ref, _, _ = Encoder(c, test_time_registers=ttr, layer=EncoderLayer).apply({"params": p["encoder"]}, seq)
    out = jit_apply(tower, {"params": p}, pixels)
    np.testing.assert_allclose(out.last_hidden_state, ref[:, :-1], atol=1e-5)


@pytest.mark.slow
def test_pruned_generation_uses_a_shorter_cache(tmp_path):
    from vitsink_jax.generate import generate
    from vitsink_jax.models.llm import init_cache

    hf = build(transformers.LlavaForConditionalGeneration, llava_config())
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    n = model.config.num_image_tokens
    ids = np.array([[1, 5, 6] + [IMAGE_TOKEN] * n + [7, 8], [0, 1, 9] + [IMAGE_TOKEN] * n + [4, 2]])
    mask = np.ones(ids.shape, np.int32)
    mask[1, 0] = 0  # left padding
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 28, 28)), jnp.float32)
    stock = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), pixels, 3)
    explicit = model.clone(attention_impl="explicit")  # the non-default path, cached decoding included
    np.testing.assert_array_equal(generate(explicit, params, jnp.asarray(ids), jnp.asarray(mask), pixels, 3),
                                  stock)
    zero = model.clone(interventions=Interventions(prune=TokenPruning(1, 0.0)))
    np.testing.assert_array_equal(generate(zero, params, jnp.asarray(ids), jnp.asarray(mask), pixels, 3), stock)
    pruned = model.clone(interventions=Interventions(prune=TokenPruning(1, 0.5)))
    cache = init_cache(model.config.text, 2, ids.shape[1] + 3, pruning=(1, n // 2))
    assert cache.keys[0].shape[1] == ids.shape[1] + 3 and cache.keys[1].shape[1] == ids.shape[1] + 3 - n // 2
    out = jit_apply(pruned, {"params": params}, jnp.asarray(ids), pixels, attention_mask=jnp.asarray(mask),
                    cache=cache)
    plain = jit_apply(pruned, {"params": params}, jnp.asarray(ids), pixels, attention_mask=jnp.asarray(mask),
                      position_ids=jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0)))
    np.testing.assert_allclose(out.logits[:, -1], plain.logits[:, -1], atol=1e-5)  # prefill = forward
    tokens = generate(pruned, params, jnp.asarray(ids), jnp.asarray(mask), pixels, 3)
    assert tokens.shape == (2, 3) and int(tokens[0, 0]) == int(np.argmax(plain.logits[0, -1]))
    with pytest.raises(ValueError, match="init_cache"):
        pruned.apply({"params": params}, jnp.asarray(ids), pixels,
                     cache=init_cache(model.config.text, 2, ids.shape[1] + 3))


def test_comparison_specs():
    from vitsink_jax.interventions import parse

    assert parse("stock") == (Interventions(), "none", 0) and parse("front")[1] == "front"
    assert parse("fastv+sinks:0.25:1")[0].prune == TokenPruning(1, 0.25, keep_sinks=True)
    assert parse("fastv")[0].prune == TokenPruning(2, 0.5) and TokenPruning().score == "last"
    assert parse("fastv-mean+sinks:0.25:1")[0].prune == TokenPruning(1, 0.25, True, "mean")
    assert parse("fastv-debias:0.25:1")[0].prune == TokenPruning(1, 0.25, debias="fit")
    assert parse("fastv-debias+sinks")[0].prune == TokenPruning(2, 0.5, True, debias="fit")
    assert parse("var:0.5:0")[0].var == AttentionRedistribution(p=0.5, first_layer=0)
    assert AttentionRedistribution().sinks == "dims" and AttentionRedistribution().queries == "after-image"
    assert parse("var-vit")[0].var == AttentionRedistribution(sinks="vit")
    assert parse("registers:3")[2] == 3
    for bad in ("bogus", "fastv:x", "var:1:2:3", "fastv:1.5"):
        with pytest.raises(ValueError, match="intervention|bad token pruning"):
            parse(bad)


@pytest.mark.slow
@pytest.mark.parametrize("sinks,text", [("vit", "llama"), ("dims", "llama"), ("vit", "phi3")])
def test_var_during_cached_generation_equals_the_forward(tmp_path, sinks, text):
    """VAR with the KV cache, sinks from the ViT or from the LLM's sink dims (a per-layer mask of
    the cached slots): the cached prefill equals the forward, and a decode step equals the
    forward over prompt + the new token (a Phi-3 LLM too: its window slides within the prompt)."""
    from vitsink_jax.generate import generate, prefill

    hf = build(transformers.LlavaForConditionalGeneration,
               llava_config(text=phi3_config() if text == "phi3" else None))
    model, params = vj.load_pretrained(save(hf, tmp_path / "llava"))
    n = model.config.num_image_tokens
    ids = np.array([[1, 5, 6] + [IMAGE_TOKEN] * n + [7, 8]] * 2)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 28, 28)), jnp.float32)
    var = model.clone(visual_tokens=vj.VisualTokenPolicy(rule=vj.SinkRule("topk", k=3)),
                      interventions=Interventions(var=AttentionRedistribution(
                          p=0.2, rho=1.0, summ=0.0, first_layer=0, sinks=sinks, sink_dims=(0, 3, 5),
                          tau=1.5, skip_last=False)))
    mask = jnp.ones(ids.shape, jnp.int32)
    out = prefill(var, params, jnp.asarray(ids), mask, pixels, 2)
    full = jit_apply(var, {"params": params}, jnp.asarray(ids), pixels)
    np.testing.assert_allclose(out.logits[:, -1], full.logits[:, -1], atol=1e-5)
    assert not np.allclose(full.logits, jit_apply(model, {"params": params}, jnp.asarray(ids), pixels).logits)
    tok = np.argmax(np.asarray(out.logits[:, -1]), -1)
    step = jit_apply(var, {"params": params}, jnp.asarray(tok[:, None]), out.cache, method=type(var).decode)
    longer = jit_apply(var, {"params": params}, jnp.asarray(np.concatenate([ids, tok[:, None]], 1)), pixels)
    np.testing.assert_allclose(step.logits[:, -1], longer.logits[:, -1], atol=1e-5)
    assert generate(var, params, jnp.asarray(ids), mask, pixels, 3).shape == (2, 3)
