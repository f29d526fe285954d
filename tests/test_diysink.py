"""DIYSink model side: the dual projector, ReW, routes, save / load, transformers interop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import vitsink_jax as vj
from conftest import assert_close, build, llava_config, save, t2n
from test_lvlm import prompt_with_images
from vitsink_jax.config import DIYSinkConfig
from vitsink_jax.diysink import route_code, to_diysink

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
    return model.apply({"params": params}, d["ids"], d["pixels"], output_vision=True, **kw)


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
    assert route_code("simple", "global") == 1 and route_code("Complex.", "local") == 2
    assert route_code("simple", "local") == 0 and route_code("no idea", "global") == 0


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
    stock_view = d["model"].apply({"params": {k: loaded[k] for k in d["params"]}}, d["ids"], d["pixels"])
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
