"""Benchmark scoring for the LVLM (used by ``evaluate.py --config.mode=benchmark``).

* Multiple choice and yes/no, ``scoring="loglik"`` (default): each candidate answer (the option
  letter, or Yes / No) is scored by its log-likelihood after the prompt. ``mc_format="cloze"``
  scores multiple choice as lm-evaluation-harness's cloze formulation instead: the prompt holds
  the question only and each option's text is the candidate (summed log-prob), the format for
  small models trained from scratch that cannot map options to letters (the mini study). When every candidate is
  one token that continues the prompt's tokenization, one row per item suffices (the candidates
  are read off the next-token distribution); otherwise each candidate gets a row and its tokens'
  log-probs are summed. All rows of a batch go through one jitted forward.
* ``scoring="generate"`` and open questions: greedy generation, then answer extraction (option
  letter / option text, yes / no, normalised exact match; numbers compared as numbers; the
  rules live in :mod:`vitsink_jax.scores`).
* Metrics: accuracy overall, per category and per global / local tag (Finding 5's table); for
  POPE, MME, CV-Bench, MMStar, ScienceQA and MathVista also the official numbers as the
  benchmark owners compute them (:func:`vitsink_jax.scores.official`, under ``official``).

Items that show the same photo share their prompt's start (the template's opening and the
image's tokens): unless the model's visual tokens depend on what follows (FastV, VAR, DIYSink
ReW, CoT routes), that prefix runs once per photo and each item's own tokens continue from its
KV cache (:mod:`vitsink_jax.prefix_sharing`, :func:`make_shared_scorer`); the scores are the
full rows'. Otherwise the full rows are scored, sorted by length so a batch's rows share a
bucket. Batches hold ``batch_size`` rows (a multiple of the device count), padded to length
buckets and split over devices by :mod:`vitsink_jax.parallel` (``mesh`` or ``pmap``); the
candidate axis is padded to a multiple of :data:`CANDIDATE_BUCKET`; each jitted scorer is built
once per (model, strategy, mesh) for the whole run (:func:`_scorer`, :func:`_shared_scorer`),
so it compiles once per padded shape, not once per call. A background thread prepares the
next batches' inputs (image decoding, padding) while the device runs the current one.
"""

from __future__ import annotations

import functools
import hashlib
from collections import defaultdict
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from . import parallel, prefix_sharing
from .data.preprocess import pixels_from_bytes
from .data.prompts import (LETTERS, PromptFormat, check_mc_format, human_start, human_text, prompt_format,
                           prompt_text)
from .data.tokenizer import encode_marked
from .diysink import cot_route
from .data.padding import bucket, left_pad, right_pad
from .data.prefetch import Prefetch
from .progress import progress
from .generate import generate
from .models.llm import init_cache
from .scores import extract_choice, extract_yes_no, official, open_match

CANDIDATE_BUCKET = 4  # the candidate axis is padded to a multiple of this: yes/no and up to 4
                      # options share one program


# ------------------------------------------------------------------------------ prompts ---

def candidates(rec: dict, mc_format: str = "letter") -> list:
    """The answers scored for a record: option letters (mc; the option texts under
    ``mc_format="cloze"``) or Yes / No (yesno)."""
    check_mc_format(mc_format)
    if rec["kind"] != "mc":
        return ["Yes", "No"]
    return list(rec["options"]) if mc_format == "cloze" else list(LETTERS[:len(rec["options"])])


def model_prompt_format(model, tokenizer=None) -> PromptFormat:
    """:func:`~vitsink_jax.data.prompts.prompt_format` of an LVLM with one image id per visual
    token its LLM gets (``interventions.image_slots``: fewer under a token reduction)."""
    c = model.config
    return prompt_format(c, tokenizer, model.interventions.image_slots(c.num_image_tokens))


def encode_question_prompt(tokenizer, prompt: str, fmt: PromptFormat, answer: str = "") -> tuple:
    """(ids [T] int32, question mask [T] bool) of ``prompt`` (followed by `` answer`` when given),
    rendered in the model's prompt format (``fmt``: :func:`~vitsink_jax.data.prompts.prompt_format`;
    a prompt in LLaVA's template is rewritten in the family's chat markup, the answer follows its
    ``answer_sep``).

    The question is the prompt's human turn (between USER and ASSISTANT in LLaVA's template:
    :func:`vitsink_jax.data.prompts.human_text`), exactly the tokens training marks for the
    same item (:func:`vitsink_jax.data.instruct.tokenize_conversation`); never the template or
    an answer. A prompt outside the template is all question. DIYSink's ReW reads this mask.
    """
    prompt = fmt.chat.render(prompt)
    try:
        start = human_start(prompt)
        span = (start, start + len(human_text(prompt)))
    except ValueError:
        span = (0, len(prompt))
    text = prompt + fmt.chat.answer_sep + answer if answer else prompt
    return encode_marked(tokenizer, text, fmt.image, [span])


def scoring_rows(tokenizer, rec: dict, templates: dict, fmt: PromptFormat,
                 mc_format: str = "letter") -> list:
    """Token rows that score one record's candidates.

    Returns a list of (ids [L] int32, targets [L] int32, cand [K] int32, which, question [L]
    bool): ``targets[t]`` is the token whose log-prob at position t counts (-1: none); ``cand``
    are candidate ids read at the last position (-1 padded); ``which`` is the candidate index of
    a per-candidate row or -1 for the shared next-token row; ``question`` marks the question's
    tokens (:func:`encode_question_prompt`: the same in every row of the record).
    """
    text = prompt_text(rec, templates, mc_format)
    base, base_q = encode_question_prompt(tokenizer, text, fmt)
    fulls = [encode_question_prompt(tokenizer, text, fmt, c)
             for c in candidates(rec, mc_format)]
    shared = all(len(f) == len(base) + 1 and np.array_equal(f[:-1], base) for f, _ in fulls)
    if shared:
        return [(base, np.full(len(base), -1, np.int32), np.array([f[-1] for f, _ in fulls], np.int32),
                 -1, base_q)]
    rows = []
    for k, (full, question) in enumerate(fulls):
        common = int(np.argmin(np.append(full[:len(base)] == base[:len(full)], False)))
        targets = np.full(len(full), -1, np.int32)
        targets[common - 1:-1] = full[common:]
        rows.append((full, targets, np.full(1, -1, np.int32), k, question))
    return rows


def record_length(tokenizer, rec: dict, cfg, fmt: PromptFormat) -> int:
    """Positions the longest row of a record takes, the image's tokens expanded: its longest
    candidate row (log-likelihood scoring), or its prompt plus ``cfg.max_new_tokens`` (the
    generation budget; and the CoT routing question with ``cfg.routing="cot"``)."""
    if rec["kind"] != "open" and cfg.scoring == "loglik":
        n = max(len(row[0]) for row in scoring_rows(tokenizer, rec, cfg.templates, fmt, cfg.mc_format))
    else:
        prompt = prompt_text(rec, cfg.templates, cfg.mc_format)
        n = len(encode_question_prompt(tokenizer, prompt, fmt)[0]) + cfg.max_new_tokens
    if cfg.routing == "cot":
        question = cfg.cot_question_prompt.format(question=rec["question"])
        n = max(n, len(encode_question_prompt(tokenizer, question, fmt)[0]) + cfg.max_new_tokens)
    return n


def split_too_long(model, tokenizer, records: list, cfg) -> tuple[list, list]:
    """(the records that fit, [{"index", "tokens"}] of those whose rows take more positions
    (:func:`record_length`) than ``cfg.max_length`` or, when it is 0, the LLM's
    ``max_position_embeddings``): a longer row is never scored, so nothing is allocated for it."""
    fmt, limit = model_prompt_format(model, tokenizer), length_limit(model, cfg)
    fit, too_long = [], []
    for rec in records:
        n = record_length(tokenizer, rec, cfg, fmt)
        if n > limit:
            too_long.append({"index": rec["index"], "tokens": n})
        else:
            fit.append(rec)
    return fit, too_long


def length_limit(model, cfg) -> int:
    """The most positions a benchmark row may take: ``cfg.max_length`` (evaluate.py's
    ``eval.max_length``), 0: the LLM's ``max_position_embeddings``."""
    return cfg.get("max_length", 0) or model.config.text.max_position_embeddings


# ------------------------------------------------------------------------------ scoring ---

def candidate_logprobs(logits, mask, targets, cand):
    """Log-likelihoods read off the logits of right-padded rows (pure, jit-able).

    Args:
      logits: [B, L, V]; mask: [B, L] 1 = token (right padding); targets: [B, L] the token whose
        log-prob at position t counts, -1 for none; cand: [B, K] candidate ids, -1 padded.
    Returns:
      (seq_lp [B]: summed log-probs of the targets, last_lp [B, K]: log-probs of the candidates
      as the next token after the last real position).
    """
    chex.assert_rank([logits, mask, targets, cand], [3, 2, 2, 2])
    chex.assert_equal_shape([mask, targets])
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)                                         # [B, L]
    tgt = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], -1)[..., 0] - lse
    seq_lp = jnp.sum(jnp.where(targets >= 0, tgt, 0.0), axis=-1)
    last = jnp.sum(mask, axis=-1) - 1
    at_last = jnp.take_along_axis(logits, last[:, None, None], 1)[:, 0]           # [B, V]
    last_lp = jnp.take_along_axis(at_last, jnp.maximum(cand, 0), -1) - \
        jnp.take_along_axis(lse, last[:, None], 1)
    return seq_lp, last_lp


def prompt_tokens(mask, targets):
    """[B, L] bool, the prompt's tokens of right-padded scoring rows (:func:`scoring_rows`): the
    real tokens up to the first with a target (the prompt's last, which predicts the candidate's
    first token); a row without targets is all prompt. mask, targets [B, L]."""
    scored = targets >= 0
    return mask.astype(bool) & (jnp.cumsum(scored, axis=1) - scored == 0)


def make_scorer(model, strategy: str = "mesh", routed: bool = False, mesh=None):
    """Jitted, data-parallel ``score(params, ids, mask, pixels, targets, cand, route, question)``
    (params replicated, or sharded on ``mesh``).

    Args (batch B, length L, K candidates): ids, mask, targets [B, L]; pixels [B, C, H, W];
    cand [B, K]; route [B] per-row token selection (used when ``routed``); question [B, L] bool
    the question tokens (DIYSink ReW reads them; :func:`encode_question_prompt`). Returns
    :func:`candidate_logprobs`'s pair and sinks [B], the ViT sinks of each row's image under the
    model's sink rule.
    """
    def score(params, ids, mask, pixels, targets, cand, route, question):
        out = model.apply({"params": params}, ids, pixels, attention_mask=mask, output_vision=True,
                          route=route if routed else None, question_mask=question,
                          prompt_mask=prompt_tokens(mask, targets))
        sinks = jnp.sum(model.visual_sinks(out.vision_features), -1)
        return (*candidate_logprobs(out.logits, mask, targets, cand), sinks)

    return parallel.data_parallel(score, strategy, mesh)


@functools.lru_cache(maxsize=32)
def _scorer(model, strategy: str, routed: bool, mesh):
    """:func:`make_scorer` built once per (model, strategy, routing, mesh): its jitted program
    then compiles once per batch shape for the whole run (every call, every benchmark), where a
    scorer built per call compiled again on every call."""
    return make_scorer(model, strategy, routed, mesh)


def placed(params, strategy: str = "mesh"):
    """(params ready for :func:`parallel.data_parallel`, their mesh or None): params sharded on a
    mesh (``load_pretrained(..., mesh=...)``, evaluate.py's eval.fsdp / eval.tensor) stay as they
    are, others are replicated."""
    mesh = parallel.params_mesh(params)
    if mesh is None:
        return parallel.replicate(params, strategy), None
    if strategy != "mesh":
        raise ValueError(f"params sharded over a mesh need the mesh strategy, not {strategy!r}")
    return params, mesh


def _pixels(model, rec: dict, cache: dict) -> np.ndarray:
    """The record's pixel_values, decoded once per distinct image (items share photos)."""
    if rec["image"] not in cache:
        cache[rec["image"]] = pixels_from_bytes(model.config, rec["image"])
    return cache[rec["image"]]


def _batches(rows: list, batch_size: int):
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        yield chunk + [chunk[-1]] * (batch_size - len(chunk)), len(chunk)


def make_shared_scorer(model, strategy: str = "mesh", mesh=None):
    """Jitted, data-parallel ``score(params, prefix, prefix_mask, pixels, group, suffix,
    suffix_mask, targets, cand)`` of rows that share their image's prompt prefix
    (:mod:`vitsink_jax.prefix_sharing`): each unit's U prefixes (with their images) are prefilled
    into a KV cache once, each of its R rows continues from its group's cache with its own
    tokens. The scores equal :func:`make_scorer`'s on the full rows.

    Args (N units, U prefixes and R rows per unit, prefix length P, suffix length S, K
    candidates): prefix, prefix_mask [N, U, P] (left-padded); pixels [N, U, C, H, W]; group
    [N, R] the unit's prefix each row continues; suffix, suffix_mask, targets [N, R, S] (right
    padded; targets as in :func:`scoring_rows`, from the suffix's first token); cand [N, R, K].
    Returns (seq_lp [N, R], last_lp [N, R, K], sinks [N, R]) as :func:`make_scorer`.
    """
    def score(params, prefix, prefix_mask, pixels, group, suffix, suffix_mask, targets, cand):
        n, u, p = prefix.shape
        r = group.shape[1]
        flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731  [N, X, ...] -> [N * X, ...]

        def to_rows(x):  # [N * U, ...] -> [N * R, ...]: row j of a unit gets its group's entry
            x = x.reshape((n, u) + x.shape[1:])
            return flat(jax.vmap(lambda a, g: a[g])(x, group))

        cache = init_cache(model.config.text, n * u, p + suffix.shape[2], model.dtype)
        out = model.apply({"params": params}, flat(prefix), flat(pixels), attention_mask=flat(prefix_mask),
                          cache=cache, output_vision=True)
        sinks = jnp.sum(model.visual_sinks(out.vision_features), -1).reshape(n, u)
        c = out.cache
        c = c.replace(keys=tuple(map(to_rows, c.keys)), values=tuple(map(to_rows, c.values)),
                      mask=to_rows(c.mask), position=to_rows(c.position))
        step = model.apply({"params": params}, flat(suffix), c, method=type(model).decode)
        seq_lp, last_lp = candidate_logprobs(step.logits, flat(suffix_mask), flat(targets), flat(cand))
        return seq_lp.reshape(n, r), last_lp.reshape(n, r, -1), jnp.take_along_axis(sinks, group, 1)

    return parallel.data_parallel(score, strategy, mesh)


@functools.lru_cache(maxsize=32)
def _shared_scorer(model, strategy: str, mesh):
    """:func:`make_shared_scorer` built once per (model, strategy, mesh), as :func:`_scorer`."""
    return make_shared_scorer(model, strategy, mesh)


def _row_plan(records: list, rows: list, bs: int, kmax: int, cfg, pad: int, routes,
              pixels) -> tuple:
    """Full rows, sorted by length, ``bs`` per batch: (per batch its (slot, record, row) list,
    batch k -> the scorer's arguments)."""
    batches = list(_batches(rows, bs))
    # every process runs as many global batches; spare ones repeat a batch and are dropped
    batches += [(batches[0][0], 0)] * (parallel.max_over_processes(len(batches)) - len(batches))
    # the collectives here, in this thread: the inputs' thread does host-local work only
    lengths = [parallel.max_over_processes(bucket(max(len(r[0]) for _, r in chunk), cfg.length_bucket))
               for chunk, _ in batches]

    def inputs(k):
        """Batch k's arrays, in the scorer's argument order (ids ... question)."""
        chunk, length = batches[k][0], lengths[k]
        ids, mask = right_pad([r[0] for _, r in chunk], length, pad)
        return (ids, mask, np.stack([pixels(records[i]) for i, _ in chunk]),
                right_pad([r[1] for _, r in chunk], length, -1)[0],
                right_pad([r[2] for _, r in chunk], kmax, -1)[0],
                np.asarray([routes[i] for i, _ in chunk], np.int32),
                right_pad([r[4] for _, r in chunk], length, False)[0])

    return [[(b, *row) for b, row in enumerate(chunk[:n])] for chunk, n in batches], inputs


def _shared_plan(records: list, rows: list, groups: list, capacity: int, kmax: int, cfg,
                 pad: int, pixels) -> tuple:
    """Units of rows sharing their image's prefix (:mod:`vitsink_jax.prefix_sharing`), one per
    local device per batch: (per batch its (slot, record, row) list, batch k -> the shared
    scorer's arguments)."""
    units = prefix_sharing.pack_units(groups, rows, capacity)
    per = parallel.batch_multiple()
    batches = [units[i:i + per] for i in range(0, len(units), per)]
    plans = [[(j * capacity + m, *rows[n]) for j, u in enumerate(b) for m, n in enumerate(u.rows)]
             for b in batches]
    # every process runs as many global batches; spare ones repeat a batch and are dropped
    spare = parallel.max_over_processes(len(batches)) - len(batches)
    batches, plans = batches + [batches[0]] * spare, plans + [[]] * spare
    shapes = [{k: parallel.max_over_processes(v) for k, v in
               prefix_sharing.batch_shapes(b, rows, cfg.length_bucket, capacity).items()} for b in batches]

    def inputs(k):
        """Batch k's arrays, in the shared scorer's argument order (prefix ... cand)."""
        filled, shape = batches[k] + [batches[k][0]] * (per - len(batches[k])), shapes[k]
        prefix, pix, group, suffix, targets, cand = [], [], [], [], [], []
        for u in filled:
            padded = u.groups + (u.groups[0],) * (shape["groups"] - len(u.groups))
            prefix += [rows[g.rows[0]][1][0][:g.prefix] for g in padded]
            pix += [pixels(records[rows[g.rows[0]][0]]) for g in padded]
            take = list(zip(u.rows, u.of_row))
            take += [take[-1]] * (capacity - len(take))
            for n, of in take:
                ids, tgt, row_c = rows[n][1][:3]
                at = u.groups[of].prefix
                group.append(of)
                suffix.append(ids[at:])
                targets.append(tgt[at:])
                cand.append(row_c)
        prefix, prefix_mask = left_pad(prefix, shape["prefix"], pad)
        suffix, suffix_mask = right_pad(suffix, shape["suffix"], pad)
        n, u, p = len(filled), shape["groups"], shape["prefix"]
        return (prefix.reshape(n, u, p), prefix_mask.reshape(n, u, p),
                np.stack(pix).reshape((n, u) + pix[0].shape), np.asarray(group, np.int32).reshape(n, capacity),
                suffix.reshape(n, capacity, -1), suffix_mask.reshape(n, capacity, -1),
                right_pad(targets, shape["suffix"], -1)[0].reshape(n, capacity, -1),
                right_pad(cand, kmax, -1)[0].reshape(n, capacity, -1))

    return plans, inputs


def loglik_scores(model, params, tokenizer, records: list, cfg, strategy: str = "mesh",
                  routes=None):
    """(per record a list with one log-likelihood per candidate, per record its sink count).
    ``routes``: per-record token selection codes (CoT routing) or None.

    Items that show the same image share their prompt's start: when the model allows it
    (:func:`vitsink_jax.prefix_sharing.shares_prefixes`, no routes) and ``cfg.share_prefixes``
    (default True) that prefix, image included, is computed once per image and each item's own
    tokens continue from its KV cache (:func:`make_shared_scorer`), in units of at most
    ``batch_size`` / devices rows. Each row then holds its own copy of its prefix's cache (every
    layer's keys and values: more memory than a full row's forward, which keeps one layer's at a
    time), so a batch size that just fits full rows may not fit shared ones. Otherwise
    the full rows are scored sorted by length (a batch holds rows of neighbouring lengths,
    padded to the bucket of its longest). Either way the results keep the record order, the
    candidate axis is padded to a multiple of :data:`CANDIDATE_BUCKET` and the run's one scorer
    for this model (:func:`_scorer`, :func:`_shared_scorer`) compiles once per padded shape."""
    fmt = model_prompt_format(model, tokenizer)
    rows = []  # (record index, row)
    for i, rec in enumerate(records):
        rows += [(i, r) for r in scoring_rows(tokenizer, rec, cfg.templates, fmt, cfg.mc_format)]
    rows.sort(key=lambda row: len(row[1][0]))  # stable: ties keep the record order
    params, mesh = placed(params, strategy)
    bs = bucket(cfg.batch_size, parallel.batch_multiple(strategy))
    kmax = parallel.max_over_processes(  # the same shapes on every host, and from call to call
        bucket(max(max(len(r[2]) for _, r in rows), 1), CANDIDATE_BUCKET))
    scores = [np.zeros(len(candidates(r, cfg.mc_format))) for r in records]
    sinks = np.zeros(len(records), np.int64)
    cache = {}
    pad = tokenizer.pad_token_id or 0
    pixels = functools.partial(_pixels, model, cache=cache)
    capacity = bs // parallel.batch_multiple(strategy)
    groups = None
    if routes is None and cfg.get("share_prefixes", True) and prefix_sharing.shares_prefixes(model):
        groups = prefix_sharing.prefix_groups(rows, [r["image"] for r in records],
                                              model.config.image_token_index, capacity)
    if parallel.max_over_processes(int(groups is None)):  # one way for every process
        scorer = _scorer(model, strategy, routes is not None, mesh)
        routes = np.zeros(len(records), np.int32) if routes is None else np.asarray(routes, np.int32)
        plans, inputs = _row_plan(records, rows, bs, kmax, cfg, pad, routes, pixels)
    else:
        plans, inputs = _shared_plan(records, rows, groups, capacity, kmax, cfg, pad, pixels)
        scorer = _shared_scorer(model, strategy, mesh)

    # one thread prepares the next two batches (image decoding, padding) while one is scored
    with Prefetch(inputs, range(len(plans)), ahead=2, workers=1) as prepared:
        for plan, batch in progress(zip(plans, prepared), total=len(plans), desc="scoring",
                                    unit="batch"):
            seq_lp, last_lp, n_sinks = jax.device_get(scorer(params, *batch))
            seq_lp, n_sinks = seq_lp.reshape(-1), n_sinks.reshape(-1)
            last_lp = last_lp.reshape(seq_lp.shape[0], -1)
            for b, i, (_, _, row_c, which, _) in plan:
                sinks[i] = n_sinks[b]
                if which < 0:
                    scores[i] = last_lp[b, :len(row_c)]
                else:
                    scores[i][which] = seq_lp[b]
    return [np.asarray(s, np.float64).tolist() for s in scores], sinks.tolist()


@functools.lru_cache(maxsize=16)
def _generator(model, max_new_tokens: int, stop: tuple, mesh, routed: bool = False):
    """Data-parallel greedy generation, compiled once per (model, length, stops, mesh); with
    ``routed`` it takes each row's image route [B] too (DIYSink CoT routing)."""
    def run(p, ids, mask, pixels, question, *route):
        return generate(model, p, ids, mask, pixels, max_new_tokens, stop, question_mask=question,
                        route=route[0] if routed else None)
    return parallel.data_parallel(run, "mesh", mesh)


def generate_texts(model, params, tokenizer, prompts: list, records: list, cfg,
                   routes: Optional[list] = None) -> list:
    """Greedy continuations (decoded text, ``cfg.max_new_tokens`` tokens at most) of prompt
    texts (with ``<image>``), each with its record's image and question mask
    (:func:`encode_question_prompt`) and, when given, its image's route (0 all tokens, 1
    sink-only, 2 non-sink-only: DIYSink CoT routing). Rows are split over the devices (params
    replicated or sharded, as for scoring); every process runs as many batches."""
    fmt = model_prompt_format(model, tokenizer)
    stop = fmt.stop_ids(tokenizer)
    params, mesh = placed(params)
    run = _generator(model, cfg.max_new_tokens, stop, mesh, routes is not None)
    texts, cache = [], {}
    encoded = [encode_question_prompt(tokenizer, p, fmt) for p in prompts]
    batches = list(_batches(list(range(len(prompts))), bucket(cfg.batch_size, parallel.batch_multiple())))
    batches += [(batches[0][0], 0)] * (parallel.max_over_processes(len(batches)) - len(batches))
    for chunk, n in progress(batches, desc="generating", unit="batch"):
        length = parallel.max_over_processes(bucket(max(len(encoded[i][0]) for i in chunk),
                                                    cfg.length_bucket))
        ids, mask = left_pad([encoded[i][0] for i in chunk], length, tokenizer.pad_token_id or 0)
        question = left_pad([encoded[i][1] for i in chunk], length)[0].astype(bool)
        pixels = np.stack([_pixels(model, records[i], cache) for i in chunk])
        route = () if routes is None else (np.asarray([routes[i] for i in chunk], np.int32),)
        out = np.asarray(run(params, ids, mask, pixels, question, *route))
        for row in out[:n]:
            texts.append(tokenizer.decode(fmt.cut(row.tolist(), stop), skip_special_tokens=True).strip())
    return texts


def cot_routes(model, params, tokenizer, records: list, cfg) -> list:
    """DIYSink (CoT): the model answers the two routing questions about each record (prompts
    ``cfg.cot_image_prompt`` / ``cfg.cot_question_prompt``); the paper's rule maps the answers to
    a route. Returns per record :func:`vitsink_jax.diysink.cot_route`'s entry ("route", the two
    answers, their classes and "route_parsed": False when an answer named no class)."""
    image = generate_texts(model, params, tokenizer, [cfg.cot_image_prompt] * len(records),
                           records, cfg)
    question = generate_texts(model, params, tokenizer,
                              [cfg.cot_question_prompt.format(question=r["question"]) for r in records],
                              records, cfg)
    return [cot_route(a, b) for a, b in zip(image, question)]


# ------------------------------------------------------------------------------ driver ---

def predict(model, params, tokenizer, records: list, cfg, strategy: str = "mesh") -> list:
    """Per record: {"index", "image_id" (:func:`image_id`), "prediction" (the extracted answer),
    "response" (the raw answer:
    the chosen candidate, or the generated text), "correct", "scores" (loglik only), "answer",
    "category", "tag", "kind", "group", "options", "answer_type", "meta"} (the record fields
    :func:`vitsink_jax.scores.official` reads)."""
    by_loglik = [i for i, r in enumerate(records) if r["kind"] != "open" and cfg.scoring == "loglik"]
    scored = set(by_loglik)
    by_gen = [i for i in range(len(records)) if i not in scored]
    preds = [None] * len(records)
    routing = cot_routes(model, params, tokenizer, records, cfg) if cfg.routing == "cot" else None
    if by_loglik:
        routes = None if routing is None else [routing[i]["route"] for i in by_loglik]
        scores, sinks = loglik_scores(model, params, tokenizer, [records[i] for i in by_loglik],
                                      cfg, strategy, routes)
        for i, s, k in zip(by_loglik, scores, sinks):
            best = int(np.argmax(s))
            preds[i] = {"prediction": LETTERS[best] if records[i]["kind"] == "mc"
                        else candidates(records[i])[best], "scores": s, "sinks": k}
    if by_gen:
        sub = [records[i] for i in by_gen]
        texts = generate_texts(model, params, tokenizer,
                               [prompt_text(r, cfg.templates, cfg.mc_format) for r in sub], sub, cfg,
                               None if routing is None else [routing[i]["route"] for i in by_gen])
        for i, text in zip(by_gen, texts):
            preds[i] = {"prediction": text, "generated": text}
    if routing is not None:
        for p, r in zip(preds, routing):
            p.update(r)
    out = []
    for rec, p in zip(records, preds):
        pred, kind = p["prediction"], rec["kind"]
        if kind == "mc":
            pred = pred if pred in LETTERS else extract_choice(pred, rec["options"])
            correct = pred == rec["answer"]
        elif kind == "yesno":
            pred = extract_yes_no(pred)
            correct = pred == rec["answer"]
        else:
            correct = open_match(pred, rec["answer"], rec["answer_type"])
        out.append({**p, "index": rec["index"], "image_id": image_id(rec), "prediction": pred,
                    "response": p["prediction"],
                    "correct": bool(correct), "answer": rec["answer"], "category": rec["category"],
                    "tag": rec["tag"], "kind": kind, "group": rec["group"], "options": rec["options"],
                    "answer_type": rec["answer_type"], "meta": rec.get("meta", {})})
    return out


def distinct_variants(model, policies: dict) -> tuple[list, dict]:
    """The distinct computations among visual-token variants ``{name: VisualTokenPolicy}`` on
    ``model``: (runs [(name, the model with that policy)], skipped {name: why}).

    A variant the model refuses (a DIYSink model: any order but its own, "none", and any sink
    rule but its own; see ``LlavaForConditionalGeneration.policy``) is skipped with the
    model's reason; one whose policy in force equals an earlier one's (e.g. "none" and
    "none+all", or two positions when nothing moves) is skipped as its duplicate, so no two rows
    of a table ever come from one computation.
    """
    runs, skipped, seen = [], {}, {}
    for name, policy in policies.items():
        variant = model.clone(visual_tokens=policy)
        try:
            p = variant.policy
        except ValueError as e:
            skipped[name] = str(e)
            continue
        key = ("stock",) if p.is_stock else (p.order, p.select, p.positions, p.rule)
        if key in seen:
            skipped[name] = f"the same computation as variant {seen[key]!r}"
            continue
        seen[key] = name
        runs.append((name, variant))
    return runs, skipped


# --------------------------------------------------------------------- interventions ---

def prompt_batch(model, tokenizer, records: list, cfg) -> dict:
    """The prompts of ``records`` as one batch: ids, mask, question [B, L] right-padded (forward)
    and left_ids, left_mask, left_question left-padded (generation), pixels [B, C, H, W];
    question: the question tokens (:func:`encode_question_prompt`)."""
    c = model.config
    fmt = model_prompt_format(model, tokenizer)
    encoded = [encode_question_prompt(tokenizer, prompt_text(r, cfg.templates, cfg.mc_format), fmt)
               for r in records]
    rows = [ids for ids, _ in encoded]
    length = bucket(max(len(i) for i in rows), cfg.length_bucket)
    pad = tokenizer.pad_token_id or 0
    questions = [q for _, q in encoded]
    out = {"pixels": np.stack([pixels_from_bytes(c, r["image"]) for r in records])}
    out["ids"], out["mask"] = right_pad(rows, length, pad)
    out["question"] = right_pad(questions, length, False)[0]
    out["left_ids"], out["left_mask"] = left_pad(rows, length, pad)
    out["left_question"] = left_pad(questions, length, False)[0]
    return out


# ------------------------------------------------------------------------------ metrics ---

def accuracy_by(preds: list, key: str) -> dict:
    """{value of ``key``: {"acc", "n"}} over predictions (empty values left out)."""
    groups = defaultdict(list)
    for p in preds:
        if p[key]:
            groups[p[key]].append(p["correct"])
    return {k: {"acc": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}


def image_id(rec: dict) -> str:
    """A benchmark record's image, named by a digest of its encoded bytes (rows asking about one
    image share it)."""
    return hashlib.sha256(rec["image"]).hexdigest()[:16]


def summarize(benchmark: str, preds: list, rules: str = "vlmevalkit") -> dict:
    """results.json's scores: overall, per category, per tag (our own extraction: ``correct``),
    and under ``official`` the benchmark owners' numbers (:func:`vitsink_jax.scores.official`
    on each prediction's raw ``response``, by the rule set ``rules``: "vlmevalkit" or
    "lmms_eval", :func:`vitsink_jax.scores.rules_for`) for the benchmarks that have them;
    ``sinks_per_image``: the sinks found, averaged over each image's questions, then over
    images."""
    per_image = defaultdict(list)  # an image asked several questions counts once
    for p in preds:
        if "sinks" in p:
            per_image[p["image_id"]].append(p["sinks"])
    res = {"n": len(preds), "accuracy": float(np.mean([p["correct"] for p in preds])),
           "sinks_per_image": float(np.mean([np.mean(v) for v in per_image.values()])) if per_image else None,
           "per_category": accuracy_by(preds, "category"), "per_tag": accuracy_by(preds, "tag")}
    numbers = official(benchmark, preds, rules=rules)
    if numbers is not None:
        res["official"] = numbers
    return res
