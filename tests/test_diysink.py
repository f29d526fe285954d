"""DIYSink model side: the dual projector, ReW, routes, save / load, transformers interop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import vitsink_jax as vj
from conftest import IMAGE_TOKEN, assert_close, build, jit_apply, llava_config, save, t2n
from test_lvlm import prompt_with_images
from vitsink_jax.config import DIYSinkConfig
from vitsink_jax import eval_lib as E
from vitsink_jax.diysink import cot_route, route_code, routing_counts, to_diysink
from vitsink_jax.sinks.fuse import keep_mask

RULE = vj.SinkRule("topk", k=3)


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    hf = build(transformers.LlavaForConditionalGeneration, llava_config())
    model, params = vj.load_pretrained(save(hf, tmp_path_factory.mktemp("diy") / "llava"))
    rng = np.random.default_rng(2)
    ids = jnp.asarray(np.concatenate([prompt_with_images(rng, 1, 16) for _ in range(2)]))
    pixels = jnp.asarray(rng.standard_normal((2, 3, 28, 28)).astype(np.float32))
    return dict(hf=hf, model=model, params=params, ids=ids, pixels=pixels)


def apply(model, params, d, **kw):
    kw.setdefault("question_mask", d["ids"] != IMAGE_TOKEN)  # every text token (ReW needs a mask)
    return jit_apply(model, {"params": params}, d["ids"], d["pixels"], output_vision=True, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("reweight", [False, True])
def test_equal_projectors_give_sink_to_front(stock, reweight):
    """Both MLPs = the single projector and w = 1 must give the stock model's sink-to-the-front."""
    d = stock
    model, params = to_diysink(d["model"], d["params"], DIYSinkConfig(RULE, reweight=reweight))
    ours = apply(model, params, d)
    front = apply(d["model"].clone(visual_tokens=vj.VisualTokenPolicy("front", rule=RULE)),
                  d["params"], d)
    np.testing.assert_allclose(ours.logits, front.logits, atol=1e-6)
    assert not np.allclose(front.logits, apply(d["model"], d["params"], d).logits, atol=1e-3)
    if reweight:
        np.testing.assert_array_equal(ours.visual_weights, np.ones((2, 2)))
        assert set(params["reweighting"]) == {"fc1", "fc2"}


def test_each_path_feeds_only_its_tokens(stock):
    d = stock
    model, params = to_diysink(d["model"], d["params"], DIYSinkConfig(RULE))
    base = apply(model, params, d)
    bumped = jax.tree_util.tree_map(lambda x: x, params)
    bumped["multi_modal_projector_sink"]["linear_2"]["bias"] = \
        params["multi_modal_projector_sink"]["linear_2"]["bias"] + 1.0
    out = apply(model, bumped, d)
    delta = np.abs(np.asarray(out.image_features - base.image_features)).max(-1)  # [N, P]
    is_sink = np.take_along_axis(np.asarray(base.visual_arrangement.sink_mask),
                                 np.asarray(base.visual_arrangement.permutation), 1)
    assert (delta[is_sink] > 0.5).all() and (delta[~is_sink] == 0).all()
    assert is_sink[:, :3].all() and not is_sink[:, 3:].any()  # sinks first


def test_reweighting_scales_each_path(stock):
    d = stock
    model, params = to_diysink(d["model"], d["params"], DIYSinkConfig(RULE, reweight=True))
    params["reweighting"]["fc2"]["bias"] = jnp.asarray([np.log(3.0), 0.0])  # w = 2*(3/4, 1/4)
    out = apply(model, params, d)
    np.testing.assert_allclose(out.visual_weights, [[1.5, 0.5]] * 2, rtol=1e-6)
    plain, _ = to_diysink(d["model"], d["params"], DIYSinkConfig(RULE))
    unweighted = apply(plain, {k: v for k, v in params.items() if k != "reweighting"}, d)
    is_sink = np.take_along_axis(np.asarray(out.visual_arrangement.sink_mask),
                                 np.asarray(out.visual_arrangement.permutation), 1)[..., None]
    want = np.where(is_sink, 1.5, 0.5) * np.asarray(unweighted.image_features)
    np.testing.assert_allclose(out.image_features, want, rtol=1e-5, atol=1e-6)


def test_routes_per_image_equal_fixed_selections(stock):
    d = stock
    model, params = to_diysink(d["model"], d["params"], DIYSinkConfig(RULE))
    routed = apply(model, params, d, route=jnp.asarray([1, 2]))
    for row, select in ((0, "sinks"), (1, "nonsinks")):
        fixed, _ = to_diysink(d["model"], d["params"], DIYSinkConfig(RULE, select=select))
        out = apply(fixed, params, d)
        kept = np.asarray(out.visual_arrangement.kept[row])
        np.testing.assert_array_equal(routed.visual_arrangement.kept[row], kept)
        text = np.asarray(d["ids"][row]) != 99
        np.testing.assert_allclose(np.asarray(routed.logits[row])[text],
                                   np.asarray(out.logits[row])[text], atol=1e-5)


def test_save_load_and_transformers_reads_the_nonsink_path(stock, tmp_path):
    d = stock
    model, params = to_diysink(d["model"], d["params"], DIYSinkConfig(RULE, reweight=True),
                               init="scratch")
    assert not np.allclose(params["multi_modal_projector_sink"]["linear_1"]["kernel"],
                           params["multi_modal_projector"]["linear_1"]["kernel"])
    out_dir = vj.save_pretrained(model, params, tmp_path / "diy")
    back, loaded = vj.load_pretrained(out_dir)
    assert back.config.diysink == DIYSinkConfig(RULE, reweight=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(str(out_dir))
    assert_close(t2n(hf.model.multi_modal_projector.linear_1.weight).T,
                 params["multi_modal_projector"]["linear_1"]["kernel"], what="non-sink projector")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(np.asarray(d["ids"])),
                 pixel_values=torch.tensor(np.asarray(d["pixels"]))).logits
    stock_view = jit_apply(d["model"], {"params": {k: loaded[k] for k in d["params"]}}, d["ids"], d["pixels"])
    assert_close(stock_view.logits, t2n(ref), what="transformers on the DIYSink checkpoint")


def test_question_encoders_are_pluggable(stock):
    d = stock
    seen = {}

    @vj.register_question_encoder("test_last_token")
    def last_token(embeds, input_ids, mask):
        seen["called"] = True
        return embeds[:, -1].astype(jnp.float32) * 3.0

    for name in ("token_histogram", "test_last_token"):
        model, params = to_diysink(d["model"], d["params"],
                                   DIYSinkConfig(RULE, reweight=True, question_encoder=name))
        width = {"token_histogram": 256, "test_last_token": 64}[name]
        assert params["reweighting"]["fc1"]["kernel"].shape[0] == width
        params["reweighting"]["fc2"]["bias"] = jnp.asarray([0.3, -0.3])
        out = apply(model, params, d)
        np.testing.assert_allclose(np.asarray(out.visual_weights).sum(-1), 2.0, rtol=1e-6)
    assert seen["called"]
    bad, _ = to_diysink(d["model"], d["params"], DIYSinkConfig(RULE, reweight=True))
    bad = bad.clone(config=dataclasses.replace(
        bad.config, diysink=DIYSinkConfig(RULE, reweight=True, question_encoder="nope")))
    with pytest.raises(ValueError, match="unknown question encoder 'nope'"):
        apply(bad, params, d)


def test_diysink_refuses_orders_and_rules_it_does_not_apply(stock):
    """A DIYSink model honours the selection ablation and refuses, by name, an order or sink rule
    other than its own; a table of variants gets one row per distinct computation."""
    d = stock
    model, params = to_diysink(d["model"], d["params"], DIYSinkConfig(RULE))
    for order in ("front", "end"):
        with pytest.raises(ValueError, match=f"order '{order}' does not apply to a DIYSink model"):
            apply(model.clone(visual_tokens=vj.VisualTokenPolicy(order, rule=RULE)), params, d)
    other = vj.SinkRule("threshold", tau=5.0)
    with pytest.raises(ValueError, match="rule='threshold'.*does not apply to a DIYSink model"):
        apply(model.clone(visual_tokens=vj.VisualTokenPolicy(rule=other)), params, d)
    ablation = apply(model.clone(visual_tokens=vj.VisualTokenPolicy("none", "sinks", rule=RULE)), params, d)
    fixed, _ = to_diysink(d["model"], d["params"], DIYSinkConfig(RULE, select="sinks"))
    np.testing.assert_array_equal(ablation.logits, apply(fixed, params, d).logits)

    specs = ("none", "front", "end", "none+all", "none+sinks", "none+all+original")
    policies = {s: vj.VisualTokenPolicy(*s.split("+"), rule=RULE) for s in specs}
    runs, skipped = E.distinct_variants(model, policies)
    assert [name for name, _ in runs] == ["none", "none+sinks", "none+all+original"]
    assert set(skipped) == {"front", "end", "none+all"}
    assert "does not apply to a DIYSink model" in skipped["front"]
    assert skipped["none+all"] == "the same computation as variant 'none'"
    runs, skipped = E.distinct_variants(d["model"], policies)        # the single-MLP model
    assert [name for name, _ in runs] == ["none", "front", "end", "none+sinks"]
    assert set(skipped) == {"none+all", "none+all+original"}      # nothing moves: stock twice
    logits = {name: np.asarray(apply(m, d["params"], d).logits) for name, m in runs}
    for a in logits:  # every row a different computation
        for b in logits:
            assert a == b or not np.allclose(logits[a], logits[b], atol=1e-6), (a, b)


def test_route_codes_are_checked(stock):
    """Codes other than 0 / 1 / 2 raise, naming the code and image, when concrete; under jit the
    logits turn NaN (never silently "nonsinks")."""
    d = stock
    model, params = to_diysink(d["model"], d["params"], DIYSinkConfig(RULE))
    with pytest.raises(ValueError, match=r"route code 5 \(image 1\) is not one of 0 \(all\)"):
        model.apply({"params": params}, d["ids"], d["pixels"], question_mask=d["ids"] != IMAGE_TOKEN,
                    route=jnp.asarray([1, 5]))
    with pytest.raises(ValueError, match="route code -1"):
        keep_mask(jnp.zeros((1, 4), bool), np.asarray([-1]))
    forward = jax.jit(lambda p, r: apply(model, p, d, route=r).logits)
    assert np.isnan(forward(params, jnp.asarray([1, 5]))).all()
    assert np.isfinite(forward(params, jnp.asarray([1, 2]))).all()


def test_cot_answers_are_read_by_whole_words():
    assert route_code("simple", "global") == 1 and route_code("Complex.", "local") == 2
    assert route_code("simple", "local") == 0 and route_code("Real-world photo", "local") == 2
    unparsed = [cot_route("simple", "a particular region"),   # "part" only inside a word
                cot_route("surreal", "global"),               # "real" only inside a word
                cot_route("simple, not complex", "global"),    # both classes named
                cot_route("no idea", "global")]
    assert [r["route"] for r in unparsed] == [0, 0, 0, 0]
    assert [r["route_parsed"] for r in unparsed] == [False] * 4
    assert unparsed[0]["cot_image_class"] == "simple" and unparsed[0]["cot_question_class"] is None
    parsed = cot_route("Simple.", "The whole image")
    assert parsed["route"] == 1 and parsed["route_parsed"]
    counts = routing_counts(unparsed + [parsed, {"index": "no routing"}])
    assert counts == {"per_route": {"all": 4, "sinks": 1, "nonsinks": 0}, "unparsed": 4,
                      "unparsed_image": 3, "unparsed_question": 1}
    assert routing_counts([{"index": "x"}]) is None
