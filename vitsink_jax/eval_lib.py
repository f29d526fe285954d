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
  letter / option text, yes / no, normalised exact match; numbers compared as numbers).
* Metrics: accuracy overall, per category and per global / local tag (Finding 5's table); MME's
  acc and acc+ (both questions of an image right) and its score 100 x (acc + acc+) per subtask;
  POPE's accuracy / precision / recall / F1 / yes-ratio.

Batches are padded to ``batch_size`` rows (a multiple of the device count) and to length buckets,
then split over devices by :mod:`vitsink_jax.parallel` (``mesh`` or ``pmap``).
"""

from __future__ import annotations

import functools
import re
import string
from collections import defaultdict

import chex
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from . import parallel
from .data.preprocess import pixels_from_bytes
from .data.tokenizer import encode_prompt
from .diysink import route_code
from .generate import generate, left_pad, prefill
from .sinks.detect import sink_mask, token_norms

LETTERS = "ABCDEFGHIJ"
TEMPLATES = {
    "mc": "USER: <image>\n{question}\n{options}\nAnswer with the option's letter from the "
          "given choices directly. ASSISTANT:",
    "yesno": "USER: <image>\n{question}\nAnswer the question using a single word or phrase. "
             "ASSISTANT:",
    "open": "USER: <image>\n{question}\nAnswer the question using a single word or phrase. "
            "ASSISTANT:",
    "cloze": "USER: <image>\n{question} ASSISTANT:",
}
MC_FORMATS = ("letter", "cloze")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


# ------------------------------------------------------------------------------ prompts ---

def _check_format(mc_format: str) -> None:
    if mc_format not in MC_FORMATS:
        raise ValueError(f"multiple-choice format {mc_format!r} not one of {MC_FORMATS}")


def candidates(rec: dict, mc_format: str = "letter") -> list:
    """The answers scored for a record: option letters (mc; the option texts under
    ``mc_format="cloze"``) or Yes / No (yesno)."""
    _check_format(mc_format)
    if rec["kind"] != "mc":
        return ["Yes", "No"]
    return list(rec["options"]) if mc_format == "cloze" else list(LETTERS[:len(rec["options"])])


def prompt_text(rec: dict, templates: dict, mc_format: str = "letter") -> str:
    """The record's prompt: its kind's template filled with the question and lettered options
    (multiple choice under ``mc_format="cloze"``: the cloze template, question only)."""
    _check_format(mc_format)
    options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(rec["options"]))
    kind = "cloze" if rec["kind"] == "mc" and mc_format == "cloze" else rec["kind"]
    return templates[kind].format(question=rec["question"], options=options)


def answer_text(rec: dict, mc_format: str = "letter") -> str:
    """The gold answer as the model should say it (the letter, or the option text in cloze)."""
    if rec["kind"] == "mc" and mc_format == "cloze":
        return rec["options"][LETTERS.index(rec["answer"])]
    return rec["answer"]


def scoring_rows(tokenizer, rec: dict, templates: dict, n_img: int, image_id: int,
                 mc_format: str = "letter") -> list:
    """Token rows that score one record's candidates.

    Returns a list of (ids [L] int32, targets [L] int32, cand [K] int32, which): ``targets[t]``
    is the token whose log-prob at position t counts (-1: none); ``cand`` are candidate ids read
    at the last position (-1 padded); ``which`` is the candidate index of a per-candidate row or
    -1 for the shared next-token row.
    """
    text = prompt_text(rec, templates, mc_format)
    base = encode_prompt(tokenizer, text, n_img, image_id)
    fulls = [encode_prompt(tokenizer, f"{text} {c}", n_img, image_id)
             for c in candidates(rec, mc_format)]
    shared = all(len(f) == len(base) + 1 and np.array_equal(f[:-1], base) for f in fulls)
    if shared:
        return [(base, np.full(len(base), -1, np.int32), np.array([f[-1] for f in fulls], np.int32), -1)]
    rows = []
    for k, full in enumerate(fulls):
        common = int(np.argmin(np.append(full[:len(base)] == base[:len(full)], False)))
        targets = np.full(len(full), -1, np.int32)
        targets[common - 1:-1] = full[common:]
        rows.append((full, targets, np.full(1, -1, np.int32), k))
    return rows


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


def make_scorer(model, strategy: str = "mesh", routed: bool = False, mesh=None):
    """Jitted, data-parallel ``score(params, ids, mask, pixels, targets, cand, route)`` (params
    replicated, or sharded on ``mesh``).

    Args (batch B, length L, K candidates): ids, mask, targets [B, L]; pixels [B, C, H, W];
    cand [B, K]; route [B] per-row token selection (used when ``routed``). Returns
    :func:`candidate_logprobs`'s pair and sinks [B], the ViT sinks of each row's image under the
    model's sink rule.
    """
    def score(params, ids, mask, pixels, targets, cand, route):
        out = model.apply({"params": params}, ids, pixels, attention_mask=mask, output_vision=True,
                          route=route if routed else None)
        sinks = jnp.sum(sink_mask(token_norms(out.vision_features), model.policy.rule), -1)
        return (*candidate_logprobs(out.logits, mask, targets, cand), sinks)

    return parallel.data_parallel(score, strategy, mesh)


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


def bucket(n: int, size: int) -> int:
    """n rounded up to a multiple of ``size`` (length buckets bound the number of compiles)."""
    return -(-n // size) * size


def _pixels(model, rec: dict, cache: dict) -> np.ndarray:
    if rec["index"] not in cache:
        cache[rec["index"]] = pixels_from_bytes(model.config, rec["image"])
    return cache[rec["index"]]


def _batches(rows: list, batch_size: int):
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        yield chunk + [chunk[-1]] * (batch_size - len(chunk)), len(chunk)


def loglik_scores(model, params, tokenizer, records: list, cfg, strategy: str = "mesh",
                  routes=None):
    """(per record a list with one log-likelihood per candidate, per record its sink count).
    ``routes``: per-record token selection codes (CoT routing) or None."""
    c = model.config
    rows = []  # (record index, row)
    for i, rec in enumerate(records):
        rows += [(i, r) for r in scoring_rows(tokenizer, rec, cfg.templates, c.num_image_tokens,
                                              c.image_token_index, cfg.mc_format)]
    params, mesh = placed(params, strategy)
    scorer = make_scorer(model, strategy, routed=routes is not None, mesh=mesh)
    routes = np.zeros(len(records), np.int32) if routes is None else np.asarray(routes, np.int32)
    bs = bucket(cfg.batch_size, parallel.batch_multiple(strategy))
    kmax = parallel.max_over_processes(max(max(len(r[2]) for _, r in rows), 1))  # same shapes on every host
    scores = [np.zeros(len(candidates(r, cfg.mc_format))) for r in records]
    sinks = np.zeros(len(records), np.int64)
    cache = {}
    pad = tokenizer.pad_token_id or 0
    batches = list(_batches(rows, bs))
    # every process runs as many global batches; spare ones repeat a batch and are dropped
    batches += [(batches[0][0], 0)] * (parallel.max_over_processes(len(batches)) - len(batches))
    for chunk, n in tqdm(batches, desc="scoring", unit="batch"):
        length = parallel.max_over_processes(bucket(max(len(r[0]) for _, r in chunk), cfg.length_bucket))
        ids = np.full((bs, length), pad, np.int32)
        mask = np.zeros((bs, length), np.int32)
        targets = np.full((bs, length), -1, np.int32)
        cand = np.full((bs, kmax), -1, np.int32)
        for b, (_, (row_ids, row_t, row_c, _)) in enumerate(chunk):
            ids[b, :len(row_ids)], mask[b, :len(row_ids)] = row_ids, 1
            targets[b, :len(row_t)], cand[b, :len(row_c)] = row_t, row_c
        pixels = np.stack([_pixels(model, records[i], cache) for i, _ in chunk])
        route = np.asarray([routes[i] for i, _ in chunk], np.int32)
        seq_lp, last_lp, n_sinks = jax.device_get(scorer(params, ids, mask, pixels, targets, cand,
                                                         route))
        for b, (i, (_, _, row_c, which)) in enumerate(chunk[:n]):
            sinks[i] = n_sinks[b]
            if which < 0:
                scores[i] = last_lp[b, :len(row_c)]
            else:
                scores[i][which] = seq_lp[b]
    return [np.asarray(s, np.float64).tolist() for s in scores], sinks.tolist()


@functools.lru_cache(maxsize=16)
def _generator(model, max_new_tokens: int, stop: tuple, mesh):
    """Data-parallel greedy generation, compiled once per (model, length, stops, mesh)."""
    return parallel.data_parallel(
        lambda p, ids, mask, pixels: generate(model, p, ids, mask, pixels, max_new_tokens, stop),
        "mesh", mesh)


def generate_texts(model, params, tokenizer, prompts: list, records: list, cfg) -> list:
    """Greedy continuations (decoded text, ``cfg.max_new_tokens`` tokens at most) of prompt
    texts (with ``<image>``), each with its record's image. Rows are split over the devices
    (params replicated or sharded, as for scoring); every process runs as many batches."""
    c = model.config
    stop = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    params, mesh = placed(params)
    run = _generator(model, cfg.max_new_tokens, stop, mesh)
    texts, cache = [], {}
    ids_list = [encode_prompt(tokenizer, p, c.num_image_tokens, c.image_token_index) for p in prompts]
    batches = list(_batches(list(range(len(prompts))), bucket(cfg.batch_size, parallel.batch_multiple())))
    batches += [(batches[0][0], 0)] * (parallel.max_over_processes(len(batches)) - len(batches))
    for chunk, n in tqdm(batches, desc="generating", unit="batch"):
        length = parallel.max_over_processes(bucket(max(len(ids_list[i]) for i in chunk), cfg.length_bucket))
        ids, mask = left_pad([ids_list[i] for i in chunk], length, tokenizer.pad_token_id or 0)
        pixels = np.stack([_pixels(model, records[i], cache) for i in chunk])
        out = np.asarray(run(params, ids, mask, pixels))
        for row in out[:n]:
            row = row.tolist()
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def cot_routes(model, params, tokenizer, records: list, cfg) -> list:
    """DIYSink (CoT): the model answers the two routing questions about each record (prompts
    ``cfg.cot_image_prompt`` / ``cfg.cot_question_prompt``); the paper's rule maps the answers to
    a route. Returns per record {"route", "cot_image", "cot_question"}."""
    image = generate_texts(model, params, tokenizer, [cfg.cot_image_prompt] * len(records),
                           records, cfg)
    question = generate_texts(model, params, tokenizer,
                              [cfg.cot_question_prompt.format(question=r["question"]) for r in records],
                              records, cfg)
    return [{"route": route_code(a, b), "cot_image": a, "cot_question": b}
            for a, b in zip(image, question)]


# --------------------------------------------------------------------- answer extraction ---

def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (VQA-style normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def extract_choice(text: str, options: list) -> str:
    """The option letter a free-form answer names, or "" when none can be read."""
    letters = LETTERS[:len(options)]
    m = re.match(rf"^\W*\(?([{letters}])\)?(?:[.:)\s]|$)", text.strip())
    if m is None:
        m = re.search(rf"answer is\W*\(?([{letters}])\b", text, re.IGNORECASE)
    if m:
        return m.group(1)
    norm = normalize_answer(text)
    hits = [LETTERS[i] for i, o in enumerate(options) if normalize_answer(o) and normalize_answer(o) in norm]
    return hits[0] if len(hits) == 1 else ""


def extract_yes_no(text: str) -> str:
    words = normalize_answer(text).split()
    return words[0] if words and words[0] in ("yes", "no") else ""


def open_match(pred: str, gold: str, answer_type: str = "text") -> bool:
    """Normalised exact match; numbers (answer_type integer/float, or a numeric gold) compared
    as numbers at the gold answer's precision."""
    try:
        g = float(gold)
    except ValueError:
        return normalize_answer(pred) == normalize_answer(gold)
    m = re.search(r"-?\d+(?:\.\d+)?", pred.replace(",", ""))
    if m is None:
        return False
    decimals = len(gold.split(".")[1]) if "." in gold else 0
    return round(float(m.group(0)), decimals) == round(g, decimals)


# ------------------------------------------------------------------------------ driver ---

def predict(model, params, tokenizer, records: list, cfg, strategy: str = "mesh") -> list:
    """Per record: {"index", "prediction", "correct", "scores" (loglik only), "answer",
    "category", "tag", "kind", "group"}."""
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
        if routing is not None:
            raise ValueError("CoT routing is implemented for log-likelihood scoring only")
        sub = [records[i] for i in by_gen]
        texts = generate_texts(model, params, tokenizer,
                               [prompt_text(r, cfg.templates, cfg.mc_format) for r in sub], sub, cfg)
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
        out.append({**p, "index": rec["index"], "prediction": pred, "correct": bool(correct),
                    "answer": rec["answer"], "category": rec["category"], "tag": rec["tag"],
                    "kind": kind, "group": rec["group"]})
    return out


# --------------------------------------------------------------------- interventions ---

def prompt_batch(model, tokenizer, records: list, cfg) -> dict:
    """The prompts of ``records`` as one batch: ids, mask [B, L] right-padded (forward) and
    left_ids, left_mask left-padded (generation), pixels [B, C, H, W]."""
    c = model.config
    rows = [encode_prompt(tokenizer, prompt_text(r, cfg.templates, cfg.mc_format), c.num_image_tokens,
                          c.image_token_index) for r in records]
    length = bucket(max(len(i) for i in rows), cfg.length_bucket)
    pad = tokenizer.pad_token_id or 0
    out = {"ids": np.full((len(rows), length), pad, np.int32), "mask": np.zeros((len(rows), length), np.int32),
           "pixels": np.stack([pixels_from_bytes(c, r["image"]) for r in records])}
    for b, row in enumerate(rows):
        out["ids"][b, :len(row)], out["mask"][b, :len(row)] = row, 1
    out["left_ids"], out["left_mask"] = left_pad(rows, length, pad)
    return out


def interleaved_seconds(fns: dict, repeats: int, warmup: bool = True) -> dict:
    """{name: median wall time of ``fn()``} (blocked on its result) with the calls taking turns,
    one of each per round, so that a slow spell of a shared machine hits every contender alike;
    one warm-up (compile) call each first unless ``warmup=False``."""
    import time

    if warmup:
        for fn in fns.values():
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def median_seconds(fn, repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn()`` (see :func:`interleaved_seconds`)."""
    return interleaved_seconds({"fn": fn}, repeats, warmup)["fn"]


def prefill_call(model, params, batch: dict):
    """A no-argument call of the jitted forward (the prefill) over ``batch`` (ids, mask, pixels)."""
    fwd = jax.jit(lambda p, i, x, m: model.apply({"params": p}, i, x, attention_mask=m).logits)
    return lambda: fwd(params, batch["ids"], batch["pixels"], batch["mask"])


def decode_call(model, params, batch: dict, steps: int = 16):
    """A no-argument call of a compiled loop of ``steps`` greedy KV-cache decode steps from the
    prefilled cache of ``batch`` (left_ids, left_mask, pixels: left-padded prompts)."""
    out = jax.jit(lambda p, i, m, x: prefill(model, p, i, m, x, steps + 1))(
        params, batch["left_ids"], batch["left_mask"], batch["pixels"])
    first = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)

    @jax.jit
    def loop(p, cache, tok):
        def body(_, carry):
            cache, tok = carry
            step = model.apply({"params": p}, tok[:, None], cache, method=type(model).decode)
            return step.cache, jnp.argmax(step.logits[:, -1], axis=-1).astype(jnp.int32)
        return jax.lax.fori_loop(0, steps, body, (cache, tok))

    return lambda: loop(params, out.cache, first)


def prefill_seconds(model, params, batch: dict, repeats: int = 5) -> float:
    """Median time of the jitted forward (the prefill) over ``batch``."""
    return median_seconds(prefill_call(model, params, batch), repeats)


def decode_step_seconds(model, params, batch: dict, steps: int = 16, repeats: int = 3) -> float:
    """Median time of one greedy KV-cache decode step over ``batch`` (:func:`decode_call`,
    divided by ``steps``)."""
    return median_seconds(decode_call(model, params, batch, steps), repeats) / steps


def register_neurons(model, params, pixels, rule, top: int) -> list:
    """Test-time registers: the ``top`` (layer, neuron, score) register neurons of the LVLM's
    vision tower on ``pixels`` [N, C, H, W], outliers = the sinks of ``rule`` on the projector
    input (the feature layer)."""
    from flax import traverse_util

    from .interventions.registers import find_register_neurons

    (selected, _), state = model.apply({"params": params}, jnp.asarray(pixels),
                                       method=model.vision_features, mutable=["intermediates"])
    layers = {}
    for path, value in traverse_util.flatten_dict(state["intermediates"]).items():
        hit = [int(m.group(1)) for k in path if (m := re.fullmatch(r"layers?_(\d+)", k))]
        if hit:  # encoder layers only (not SigLIP's pooling head)
            layers[hit[0]] = value[0]
    acts = [layers[i] for i in sorted(layers)]
    c = model.config
    sinks = np.asarray(sink_mask(token_norms(selected), rule))
    n, off = sinks.shape[0], c.visual_cls_offset  # tower order: CLS, trained registers, patches
    gap = np.zeros((n, c.vision.prefix_tokens - off), bool)
    outliers = np.concatenate([sinks[:, :off], gap, sinks[:, off:]], axis=1)
    return find_register_neurons(acts, outliers, top)


# ------------------------------------------------------------------------------ metrics ---

def accuracy_by(preds: list, key: str) -> dict:
    """{value of ``key``: {"acc", "n"}} over predictions (empty values left out)."""
    groups = defaultdict(list)
    for p in preds:
        if p[key]:
            groups[p[key]].append(p["correct"])
    return {k: {"acc": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}


def mme_scores(preds: list) -> dict:
    """MME: per subtask acc, acc+ (an image counts when all its questions are right) and
    score = 100 x (acc + acc+); perception and cognition totals."""
    per = {}
    for cat in sorted({p["category"] for p in preds}):
        items = [p for p in preds if p["category"] == cat]
        images = defaultdict(list)
        for p in items:
            images[p["group"] or p["index"]].append(p["correct"])
        acc = float(np.mean([p["correct"] for p in items]))
        acc_plus = float(np.mean([all(v) for v in images.values()]))
        per[cat] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus), "n": len(items)}
    cognition = sum(v["score"] for k, v in per.items() if k.lower().replace(" ", "_") in COGNITION)
    perception = sum(v["score"] for k, v in per.items() if k.lower().replace(" ", "_") not in COGNITION)
    return {"subtasks": per, "perception": perception, "cognition": cognition}


def pope_scores(preds: list) -> dict:
    """POPE with "yes" as the positive class: accuracy, precision, recall, F1, yes ratio."""
    pred = np.array([p["prediction"] == "yes" for p in preds])
    gold = np.array([p["answer"] == "yes" for p in preds])
    tp, fp, fn = np.sum(pred & gold), np.sum(pred & ~gold), np.sum(~pred & gold)
    precision = float(tp / max(tp + fp, 1))
    recall = float(tp / max(tp + fn, 1))
    return {"accuracy": float(np.mean(pred == gold)), "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-12),
            "yes_ratio": float(np.mean(pred))}


def summarize(benchmark: str, preds: list) -> dict:
    """results.json's scores: overall, per category, per tag, and the benchmark's own metric."""
    sinks = [p["sinks"] for p in preds if "sinks" in p]
    res = {"n": len(preds), "accuracy": float(np.mean([p["correct"] for p in preds])),
           "sinks_per_image": float(np.mean(sinks)) if sinks else None,
           "per_category": accuracy_by(preds, "category"), "per_tag": accuracy_by(preds, "tag")}
    if benchmark == "mme":
        res["mme"] = mme_scores(preds)
    if benchmark == "pope":
        res["pope"] = pope_scores(preds)
    return res
