"""DIYSink (paper Sec. 4.2) around a stock LLaVA: building the dual-projector model from a
checkpoint, and the CoT routing that picks sink-only / non-sink-only / both per item.

CoT routing asks the LVLM itself two questions (prompts in the config; the paper's exact wording
is UNKNOWN, these are ours): is the image simple / symbolic or complex / real-world, and does the
question need the whole image (global) or a detail (local). Rule (paper): simple + global ->
sink-only; complex + local -> non-sink-only; anything else -> both. Answers are read by whole cue
words; one that names neither class (or both) is unparsed, routes to both and is counted in the
results (:func:`routing_counts`).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax.core import unfreeze

from .config import DIYSinkConfig

ROUTES = ("all", "sinks", "nonsinks")  # route codes 0, 1, 2 (as VisualTokenPolicy selections)
# CoT answers -> classes, by whole cue words (see parse_class)
IMAGE_CLASSES = {"simple": ("simple", "symbolic"), "complex": ("complex", "real")}
QUESTION_CLASSES = {"global": ("global", "whole"), "local": ("local", "part")}
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
        tokens = jnp.zeros((1, 1, c.projector_input_size))
        embeds, ids = jnp.zeros((1, 1, c.text.hidden_size)), jnp.zeros((1, 1), jnp.int32)

        def new_parts(m):
            return {n: (m.question_weights(embeds, ids, jnp.ones_like(ids)) if n == "reweighting"
                        else m.multi_modal_projector_sink(tokens)) for n in todo}

        fresh = unfreeze(new.init(jax.random.PRNGKey(0) if rng is None else rng,
                                  method=new_parts)["params"])
        out.update({n: fresh[n] for n in todo})
    return new, out


def parse_class(answer: str, classes: dict):
    """The class a free answer names: {class: cue words} -> the one class whose cue words occur in
    ``answer`` as whole words (case-insensitive; "real-world" is "real" and "world", "particular"
    is not "part"), or None when it names none or more than one."""
    words = set(re.findall(r"[a-z]+", answer.lower()))
    hits = [name for name, cues in classes.items() if words & set(cues)]
    return hits[0] if len(hits) == 1 else None


def cot_route(image_answer: str, question_answer: str) -> dict:
    """The paper's routing rule on the model's two answers -> {"route": code into :data:`ROUTES`,
    "cot_image", "cot_question": the answers, "cot_image_class" (simple / complex / None),
    "cot_question_class" (global / local / None), "route_parsed": both answers named one class}.
    simple + global -> sink-only, complex + local -> non-sink-only, anything else (unparsed
    answers included) -> both."""
    image, question = parse_class(image_answer, IMAGE_CLASSES), parse_class(question_answer, QUESTION_CLASSES)
    route = {("simple", "global"): "sinks", ("complex", "local"): "nonsinks"}.get((image, question), "all")
    return {"route": ROUTES.index(route), "cot_image": image_answer, "cot_question": question_answer,
            "cot_image_class": image, "cot_question_class": question,
            "route_parsed": image is not None and question is not None}


def route_code(image_answer: str, question_answer: str) -> int:
    """The route code (:data:`ROUTES`) of :func:`cot_route`."""
    return cot_route(image_answer, question_answer)["route"]


def routing_counts(preds: list):
    """CoT routing in a benchmark's results: items per route and the answers that named no class
    (or both), from predictions carrying :func:`cot_route`'s keys; None without routing."""
    routed = [p for p in preds if "route_parsed" in p]
    if not routed:
        return None
    return {"per_route": {name: sum(p["route"] == i for p in routed) for i, name in enumerate(ROUTES)},
            "unparsed": sum(not p["route_parsed"] for p in routed),
            "unparsed_image": sum(p["cot_image_class"] is None for p in routed),
            "unparsed_question": sum(p["cot_question_class"] is None for p in routed)}
