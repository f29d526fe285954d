"""The harness' "ViT sinks kept" column (vitsink_jax.interventions.report) against hand
computations, FastV's kept ViT positions reproduced outside the model equal to the model's own
pruning, and FastV / debiased FastV on every supported family's tiny random checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import vitsink_jax as vj
from conftest import (IMAGE_TOKEN, build, clip_vision_config, dinov2_config, gemma3_config,
                      gemma3_text_config, internvl_config, jit_apply, llava_config, phi_config, qwen2_5_vl_config,
                      save, siglip_vision_config)
from vitsink_jax.interventions import Interventions, TokenPruning, parse
from vitsink_jax.interventions.report import (kept_positions, sink_share, sink_share_kept, tower_to_vit,
                                              vit_positions)


def test_sink_share_hand_computed():
    """Image 0 keeps 1 of its 2 sinks, image 1 has none (left out), image 2 keeps 1 of 3:
    (1/2 + 1/3) / 2 = 5/12; keeping everything gives 1; no sink anywhere gives None."""
    sinks = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1]], bool)
    assert sink_share_kept(np.array([[0, 2], [1, 3], [1, 0]]), sinks) == pytest.approx(5 / 12)
    assert sink_share_kept(np.broadcast_to(np.arange(4), (3, 4)), sinks) == 1.0
    assert sink_share_kept(np.array([[0, 1]]), np.zeros((1, 4), bool)) is None
    with pytest.raises(ValueError, match="outside"):
        sink_share_kept(np.array([[0, 4]]), np.ones((1, 4), bool))


def test_vit_positions_hand_computed():
    """Sequence slots 1..4 hold ViT tokens 0..3; FastV keeps slots 0, 2, 4, 5, i.e. ViT tokens
    1 and 3; after sink-to-the-front (slot j holds ViT token perm[j]) they are tokens 2 and 0."""
    kept = jnp.asarray([[0, 2, 4, 5]])
    visual = jnp.asarray([[False, True, True, True, True, False]])
    np.testing.assert_array_equal(vit_positions(kept, visual, 2), [[1, 3]])
    np.testing.assert_array_equal(vit_positions(kept, visual, 2, jnp.asarray([[3, 2, 1, 0]])), [[2, 0]])


def test_a_reductions_merged_tokens_keep_no_sink():
    """A token reduction's tower positions (CLIP: [CLS] 0, patches 1..4 = ViT positions 0..3):
    slots holding tower tokens 4 and 2 keep ViT positions 3 and 1; -1 (a merged token) and the
    [CLS] (not a ViT position) keep none. Sinks at ViT 1 and 2: one of two kept -> 1/2."""
    index = jnp.asarray([[1, 2, 3, 4]])
    kept = tower_to_vit(jnp.asarray([[4, 2, -1, 0]]), index)
    np.testing.assert_array_equal(kept, [[3, 1, -1, -1]])
    assert sink_share_kept(kept, np.array([[0, 1, 1, 0]], bool)) == 0.5
    with pytest.raises(ValueError, match="outside"):
        sink_share_kept(np.array([[-2]]), np.ones((1, 4), bool))


def _family(name: str):
    """(transformers class, config, image side) of a supported family's tiny checkpoint."""
    llava = transformers.LlavaForConditionalGeneration
    return {"llava-clip": (llava, llava_config(vision=clip_vision_config()), 28),
            "llava-siglip": (llava, llava_config(vision=siglip_vision_config()), 28),
            "llava-dinov2": (llava, llava_config(vision=dinov2_config()), 28),
            "llava-phi": (llava, llava_config(text=phi_config()), 28),
            # a window longer than the rows: pruning over more slots than the window is refused
            "gemma3": (transformers.Gemma3ForConditionalGeneration,
                       gemma3_config(text=gemma3_text_config(sliding_window=32)), 28),
            "internvl": (transformers.InternVLForConditionalGeneration, internvl_config(), 28),
            "qwen2_5_vl": (transformers.Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config(), 16)}[name]


def _checkpoint(name: str, folder):
    """(model with a top-2 sink rule, params, batch of 2 prompt rows) of a family."""
    cls, config, side = _family(name)
    model, params = vj.load_pretrained(save(build(cls, config), folder))
    model = model.clone(visual_tokens=vj.VisualTokenPolicy(rule=vj.SinkRule("topk", k=2)))
    rng = np.random.default_rng(0)
    n = model.config.num_image_tokens
    ids = np.concatenate([rng.integers(3, 90, (2, 3)), np.full((2, n), IMAGE_TOKEN),
                          rng.integers(3, 90, (2, 4))], 1)
    batch = {"ids": ids, "mask": np.ones(ids.shape, np.int32),
             "pixels": rng.standard_normal((2, 3, side, side)).astype(np.float32)}
    return model, params, batch


def _model_kept(model, params, batch, prune):
    """The visual slots the model's own pruning keeps (its outputs are zero at pruned tokens),
    as ViT positions, and the pruned forward's output."""
    pruned = model.clone(interventions=Interventions(prune=prune))
    out = jax.jit(lambda p, i, x, m: pruned.apply({"params": p}, i, x, attention_mask=m,
                                                  output_hidden_states=True, output_attentions=True))(
        params, jnp.asarray(batch["ids"]), jnp.asarray(batch["pixels"]), jnp.asarray(batch["mask"]))
    visual = batch["ids"] == IMAGE_TOKEN
    live = np.abs(np.asarray(out.hidden_states[-1])).sum(-1) > 0
    return [np.flatnonzero(live[b][visual[b]]) for b in range(visual.shape[0])], pruned, out


@pytest.mark.slow  # ~15 s unloaded, a minute on a busy 2-core machine: five compiles
def test_kept_positions_are_the_models_own_pruning(tmp_path):
    """FastV reproduced outside the model (one forward, layer K-1's attention, the same
    selection) keeps the ViT positions the pruned model keeps; sink-aware debiased FastV keeps
    every sink (share 1); the keep-all stock model keeps all P."""
    model, params, batch = _checkpoint("llava-clip", tmp_path / "llava")
    n = model.config.num_image_tokens
    for prune in (TokenPruning(1, 0.75), TokenPruning(1, 0.75, True, debias="fit")):
        inside, pruned, _ = _model_kept(model, params, batch, prune)
        positions = kept_positions(pruned)
        kept, sinks = positions(params, batch)
        assert kept.shape == (2, n - int(0.75 * n)) and sinks.shape == (2, n)
        np.testing.assert_array_equal(kept, np.stack(inside))
        share = sink_share(params, [batch], positions)
        assert share == (1.0 if prune.keep_sinks else sink_share_kept(kept, sinks)) and 0 <= share <= 1
    positions = kept_positions(model)
    kept, sinks = positions(params, batch)
    np.testing.assert_array_equal(kept, np.broadcast_to(np.arange(n), (2, n)))
    assert sinks.sum(1).tolist() == [2, 2] and sink_share(params, [batch], positions) == 1.0


# (~25 s each unloaded, ~2 minutes on a busy 2-core machine: a tiny checkpoint built, saved,
# loaded and compiled six times)
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava-clip", "llava-siglip", "llava-dinov2", "llava-phi", "gemma3",
                                    "internvl", "qwen2_5_vl"])
def test_fastv_and_debiased_fastv_on_every_family(tmp_path, family):
    """Every family prunes: the later layers run on T - int(r P) tokens, the model keeps
    P - int(r P) visual tokens per row (those :func:`kept_positions` reproduces), and r = 0
    equals stock exactly; then the token reductions (:func:`check_reductions`)."""
    model, params, batch = _checkpoint(family, tmp_path / family)
    n, t = model.config.num_image_tokens, batch["ids"].shape[1]
    ids, pixels = jnp.asarray(batch["ids"]), jnp.asarray(batch["pixels"])
    def logits(m):
        return jax.jit(lambda p, i, x: m.apply({"params": p}, i, x).logits)(params, ids, pixels)

    stock = logits(model)
    for prune in (TokenPruning(1, 0.5), TokenPruning(1, 0.5, True, debias="fit")):
        inside, pruned, out = _model_kept(model, params, batch, prune)
        drop = int(0.5 * n)
        assert out.logits.shape == stock.shape and np.isfinite(np.asarray(out.logits)).all()
        assert out.attentions[-1].shape[-2:] == (t - drop, t - drop)
        assert [len(k) for k in inside] == [n - drop] * 2
        np.testing.assert_array_equal(kept_positions(pruned)(params, batch)[0], np.stack(inside))
    # r = 0 against stock on one attention kernel: the pruning layer reads its weights (the
    # explicit path), which the fused default rounds differently (~3e-7 on Gemma 3)
    explicit = model.clone(attention_impl="explicit")
    zero = explicit.clone(interventions=Interventions(prune=TokenPruning(1, 0.0, True, debias="fit")))
    np.testing.assert_array_equal(logits(zero), logits(explicit))
    check_reductions(family, model, params, batch, logits, stock)


def check_reductions(family: str, model, params, batch: dict, logits, stock):
    """The token reductions on a family: DivPrune everywhere but Qwen2.5-VL (refused by name),
    FasterVLM on the towers with a [CLS]; keeping every token equals ``stock`` exactly (both
    through ``logits(model)``, the test's jitted forward on the batch), keeping
    half runs the LLM on the image's round(P / 2) slots, each a tower position of the image."""
    n, ids, pixels = model.config.num_image_tokens, batch["ids"], jnp.asarray(batch["pixels"])
    if family == "qwen2_5_vl":
        with pytest.raises(ValueError, match="multimodal RoPE"):
            model.clone(interventions=parse("divprune:0.5")[0]).apply({"params": params}, jnp.asarray(ids), pixels)
        return
    for name in ("divprune", "fastervlm") if family in ("llava-clip", "llava-dinov2", "llava-phi") else ("divprune",):
        full = model.clone(interventions=parse(f"{name}:1")[0])
        np.testing.assert_array_equal(logits(full), stock, err_msg=name)
        half = model.clone(interventions=parse(f"{name}:0.5")[0])
        k = half.interventions.image_slots(n)
        assert k == (round(n / 2) if name == "divprune" else n // 2)
        visual = np.flatnonzero(ids[0] == IMAGE_TOKEN)
        short = np.concatenate([ids[:, :visual[0]], ids[:, visual[:k]], ids[:, visual[-1] + 1:]], 1)
        out = jit_apply(half, {"params": params}, jnp.asarray(short), pixels, output_vision=True)
        assert out.logits.shape[:2] == short.shape and np.isfinite(np.asarray(out.logits)).all()
        index = np.asarray(out.vision_token_index)
        assert index.shape == (2, k) and ((index >= 0) | (family == "gemma3")).all(), (name, index)
