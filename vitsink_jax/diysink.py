"""DIYSink (paper Sec. 4.2) around a stock LLaVA: building the dual-projector model from a
checkpoint, and the CoT routing that picks sink-only / non-sink-only / both per item.

CoT routing asks the LVLM itself two questions (prompts in the config; the paper's exact wording
is UNKNOWN, these are ours): is the image simple / symbolic or complex / real-world, and does the
question need the whole image (global) or a detail (local). Rule (paper): simple + global ->
sink-only; complex + local -> non-sink-only; anything else -> both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax.core import unfreeze

from .config import DIYSinkConfig

ROUTES = ("all", "sinks", "nonsinks")  # route codes 0, 1, 2 (as VisualTokenPolicy selections)
IMAGE_PROMPT = ("USER: <image>\nIs this image simple or symbolic (a diagram, chart, icon, text or "
                "a single object on a plain background), or complex and real-world (a natural "
                "scene)? Answer with one word: simple or complex. ASSISTANT:")
QUESTION_PROMPT = ("USER: <image>\nQuestion: {question}\nDoes answering this question need the "
                   "whole image (global) or one small part of it (local)? Answer with one word: "
                   "global or local. ASSISTANT:")


def to_diysink(model, params, diysink: DIYSinkConfig, init: str = "copy", rng=None):
    """(model, params) of a stock LLaVA (or of a DIYSink model, e.g. to add ReW) -> the DIYSink
    model of ``diysink`` (same module options) and its params.

    init: "copy" (the sink projector starts as the pretrained one) or "scratch" (freshly
    initialised); a sink projector the params already hold is kept. Every other part keeps its
    pretrained weights (as they are: sharded params stay sharded); the ReW MLP, when configured
    and new, starts at w = (1, 1). Only the new parts are initialised (the whole LVLM never is),
    with the random streams a whole-model init would give them.
    """
    if init not in ("copy", "scratch"):
        raise ValueError(f"DIYSink init {init!r} not one of copy, scratch")
    new = model.clone(config=dataclasses.replace(model.config, diysink=diysink))
    out = dict(params)
    if init == "copy" and "multi_modal_projector_sink" not in params:
        out["multi_modal_projector_sink"] = jax.tree_util.tree_map(
            lambda x: x.copy(), params["multi_modal_projector"])
    todo = [n for n in ("multi_modal_projector_sink", "reweighting")
            if n not in out and (n != "reweighting" or diysink.reweight)]
    if todo:
        c = model.config
        tokens = jnp.zeros((1, 1, params["multi_modal_projector"]["linear_1"]["kernel"].shape[0]))
        embeds, ids = jnp.zeros((1, 1, c.text.hidden_size)), jnp.zeros((1, 1), jnp.int32)

        def new_parts(m):
            return {n: (m.question_weights(embeds, ids, jnp.ones_like(ids)) if n == "reweighting"
                        else m.multi_modal_projector_sink(tokens)) for n in todo}

        fresh = unfreeze(new.init(jax.random.PRNGKey(0) if rng is None else rng,
                                  method=new_parts)["params"])
        out.update({n: fresh[n] for n in todo})
    return new, out


def route_code(image_answer: str, question_answer: str) -> int:
    """The paper's routing rule on the two parsed answers -> code into :data:`ROUTES`."""
    simple = "simple" in image_answer.lower() or "symbolic" in image_answer.lower()
    complex_ = "complex" in image_answer.lower() or "real" in image_answer.lower()
    glob = "global" in question_answer.lower() or "whole" in question_answer.lower()
    local = "local" in question_answer.lower() or "part" in question_answer.lower()
    if simple and not complex_ and glob and not local:
        return ROUTES.index("sinks")
    if complex_ and not simple and local and not glob:
        return ROUTES.index("nonsinks")
    return ROUTES.index("all")
