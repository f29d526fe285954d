"""Scoring, answer extraction and metrics; log-likelihoods against a direct forward; greedy
generation against transformers; the same scores on 1 and 8 devices."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

import vitsink_jax as vj
from conftest import build, device_env, jit_apply, llama_config, llava_config, random_ids, save
from vitsink_jax import eval_lib as E
from vitsink_jax import scores as S
from vitsink_jax import timing
from vitsink_jax.data.instruct import tokenize_conversation
from vitsink_jax.data.prompts import (CHATS, TEMPLATES, ImageSlots, PromptFormat, answer_text, human_text,
                                     prompt_format)
from vitsink_jax.data.synthetic import embedded_benchmark
from vitsink_jax.data.tokenizer import encode_prompt, train_embedded_tokenizer
from vitsink_jax.diysink import IMAGE_PROMPT, QUESTION_PROMPT, to_diysink
from vitsink_jax.config import DIYSinkConfig
from vitsink_jax.embedded import embedded_tokenizer
from vitsink_jax.data.padding import left_pad
from vitsink_jax.generate import filter_logits, generate

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 512  # a byte-level BPE needs 256 + specials ids at least


def test_candidate_logprobs_on_known_logits():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [1 / 3] * 3]]))
    mask = np.array([[1, 1, 0]])
    targets = np.array([[1, -1, -1]])  # position 0 predicts token 1
    seq, last = E.candidate_logprobs(jnp.asarray(logits), jnp.asarray(mask), jnp.asarray(targets),
                                     jnp.asarray([[2, 0, -1]]))
    np.testing.assert_allclose(seq, [np.log(0.25)], rtol=1e-6)
    np.testing.assert_allclose(last[0, :2], np.log([0.7, 0.1]), rtol=1e-6)  # last real = pos 1


def test_answer_extraction():
    opts = ["a cat", "a dog", "a red car"]
    """Our generation path's lenient rules (vitsink_jax.scores; VLMEvalKit's own rules are
    tested in test_scores.py)."""
    assert S.extract_choice("B", opts) == "B"
    assert S.extract_choice("(C) a red car", opts) == "C"
    assert S.extract_choice("The answer is A.", opts) == "A"
    assert S.extract_choice("I think it is a dog", opts) == "B"
    assert S.extract_choice("no idea", opts) == ""
    assert S.extract_choice("D", opts) == ""  # not an option letter here
    assert S.extract_yes_no("Yes, there is.") == "yes" and S.extract_yes_no("Maybe") == ""
    assert S.open_match("The Red.", "red") and not S.open_match("blue", "red")
    assert S.open_match("about 3.14159", "3.14", "float") and S.open_match("12", "12.0")
    assert not S.open_match("13", "12", "integer") and not S.open_match("none", "12")


def test_embedded_benchmark_limit_gives_its_first_records():
    """evaluate.py's benchmark.limit on the embedded benchmark: the same first records, without
    loading the photos after them."""
    from unittest import mock

    from vitsink_jax.data import synthetic

    full = embedded_benchmark(seed=0, variants=2, size=28, photos=["chelsea", "coffee", "rocket"])
    with mock.patch.object(synthetic, "load_photo", wraps=synthetic.load_photo) as load:
        assert embedded_benchmark(seed=0, variants=2, size=28, photos=["chelsea", "coffee", "rocket"],
                                  limit=7) == full[:7]
    assert load.call_count == 2  # 6 records per photo


def _pred(correct, category="c", group="", prediction="", answer="", tag=""):
    return dict(correct=correct, category=category, group=group, prediction=prediction,
                answer=answer, tag=tag, index=str(id(object())))


def test_summarize_per_tag():
    """(MME / POPE and the other official numbers: test_scores.py.)"""
    s = E.summarize("x", [_pred(True, tag="global"), _pred(False, tag="local"), _pred(True, tag="local")])
    assert s["per_tag"] == {"global": {"acc": 1.0, "n": 1}, "local": {"acc": 0.5, "n": 2}}


def test_sinks_per_image_averages_images_not_questions():
    """An image asked three questions (2 sinks) and one asked once (6 sinks): 4 sinks per image,
    not the 3 per question."""
    preds = [{**_pred(True), "sinks": 2, "image_id": "a"} for _ in range(3)] + [
        {**_pred(True), "sinks": 6, "image_id": "b"}]
    assert E.summarize("x", preds)["sinks_per_image"] == 4.0
    assert E.image_id({"image": b"png"}) == E.image_id({"image": b"png"}) != E.image_id({"image": b"jpg"})


# ------------------------------------------------------------ with a tiny LLaVA and tokenizer ---

def eval_cfg(**kw):
    base = dict(scoring="loglik", batch_size=4, length_bucket=16, max_new_tokens=4,
                templates=dict(TEMPLATES), mc_format="letter", routing="none", cot_image_prompt=IMAGE_PROMPT,
                cot_question_prompt=QUESTION_PROMPT)
    return ml_collections.ConfigDict({**base, **kw})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = embedded_tokenizer(VOCAB)
    assert tok.convert_tokens_to_ids("<image>") == VOCAB - 1
    hf = build(transformers.LlavaForConditionalGeneration,
               llava_config(text=llama_config(vocab_size=VOCAB), image_token_index=VOCAB - 1,
                            vision_feature_layer=-1))
    model, params = vj.load_pretrained(save(hf, tmp_path_factory.mktemp("ev") / "llava"))
    records = embedded_benchmark(seed=0, variants=1, size=28, photos=["chelsea", "coffee"])
    return dict(hf=hf, model=model, params=params, tok=tok, records=records)


def _direct_logprobs(d, rec, text_suffix=""):
    """log_softmax at the last prompt position, from one plain forward."""
    c = d["model"].config
    ids = encode_prompt(d["tok"], E.prompt_text(rec, TEMPLATES) + text_suffix, prompt_format(c).image)
    pix = E._pixels(d["model"], rec, {})[None]
    logits = jit_apply(d["model"], {"params": d["params"]}, jnp.asarray(ids[None]), jnp.asarray(pix)).logits
    return ids, np.asarray(jax.nn.log_softmax(logits[0], -1))


@pytest.mark.slow
def test_loglik_equals_direct_forward(tiny):
    d = tiny
    scores, _ = E.loglik_scores(d["model"], d["params"], d["tok"], d["records"], eval_cfg())
    for rec, s in zip(d["records"], scores):
        _, lp = _direct_logprobs(d, rec)
        cands = [d["tok"].convert_tokens_to_ids("Ġ" + L) for L in "ABCD"]
        np.testing.assert_allclose(s, lp[-1, cands], atol=1e-5)


@pytest.mark.slow
def test_multi_token_candidates_sum_their_tokens(tiny):
    d = tiny
    plain = train_embedded_tokenizer(["hello world"], VOCAB)  # no merges for " A": 2 tokens
    rec = d["records"][0]
    c = d["model"].config
    rows = E.scoring_rows(plain, rec, TEMPLATES, prompt_format(c))
    assert len(rows) == 4 and all(r[3] == k for k, r in enumerate(rows))
    scores, _ = E.loglik_scores(d["model"], d["params"], plain, [rec], eval_cfg())
    d2 = {**d, "tok": plain}
    for k, letter in enumerate("ABCD"):
        ids, lp = _direct_logprobs(d2, rec, f" {letter}")
        n = len(rows[k][0]) - int(np.sum(rows[k][1] >= 0))  # context length
        want = sum(lp[t - 1, ids[t]] for t in range(n, len(ids)))
        np.testing.assert_allclose(scores[0][k], want, atol=1e-4)


@pytest.mark.parametrize("family", ["embedded", "llama", "qwen2"])
def test_training_supervises_exactly_the_tokens_evaluation_scores(family, tmp_path):
    """Issue 22.3: after a prompt that ends at ``ASSISTANT:`` the model must produce the answer's
    first token, which for these answers is the space on its own (byte-level ``Ġ`` / LLaMA's
    ``▁`` before a digit, an unmerged letter, a byte-fallback character). Training's loss mask
    (tokenize_conversation) covers, per answer, the same tokens at the same positions as
    scoring_rows scores for that answer after that prompt, plus ``</s>``; never the prompt."""
    options = ["A cat", "2", "12 cats", "(b) x", "Zebra", "Yes", "\u20ac 5"]
    corpus = list(TEMPLATES.values()) + ["What is on the table? A cat sits on 2 mats.", "Yes", "No"]
    tok = embedded_tokenizer(VOCAB) if family == "embedded" else \
        __import__("conftest").hf_tokenizer(family, tmp_path, corpus)
    fmt = PromptFormat(CHATS["llava"], ImageSlots(3, tok.convert_tokens_to_ids("<image>")))
    rec = {"kind": "mc", "question": "What is on the table?", "options": options, "answer": "A"}
    own_space = 0
    for mc_format in ("letter", "cloze"):
        prompt = E.prompt_text(rec, TEMPLATES, mc_format)
        rows = E.scoring_rows(tok, rec, TEMPLATES, fmt, mc_format)
        for k, answer in enumerate(E.candidates(rec, mc_format)):
            ids, loss, question = tokenize_conversation(tok, ["human", "gpt"],
                                                        [human_text(prompt), answer], fmt)
            if rows[0][3] == -1:  # one shared row: the candidate is the next token
                full = np.append(rows[0][0], rows[0][2][k])
                scored = [len(rows[0][0])]
            else:
                full, targets = rows[k][0], rows[k][1]
                scored = list(np.flatnonzero(targets >= 0) + 1)  # position t scores token t + 1
                np.testing.assert_array_equal(targets[np.array(scored) - 1], full[scored])
            assert ids[-1] == tok.eos_token_id and loss[-1]
            np.testing.assert_array_equal(ids[:-1], full)  # the same text, the same tokens
            assert list(np.flatnonzero(loss[:-1])) == scored, (answer, tok.convert_ids_to_tokens(
                ids[np.flatnonzero(loss)].tolist()))
            assert not (loss & question).any()
            own_space += tok.convert_ids_to_tokens(int(ids[scored[0]])) in ("\u0120", "\u2581")
    assert own_space >= 3  # the case the issue names occurs with every tokenizer here


def _prompts(rng, c, lengths, image_id=VOCAB - 1):
    return [np.concatenate([[1], random_ids(rng, 1, n)[0], [image_id] * c.num_image_tokens,
                            random_ids(rng, 1, 3)[0]]) for n in lengths]


@pytest.mark.slow
@pytest.mark.parametrize("policy", [None, "front"])
def test_greedy_generation_matches_transformers(tiny, rng, policy):
    d = tiny
    c = d["model"].config
    ids, mask = left_pad(_prompts(rng, c, (2, 5)), 16 + c.num_image_tokens)
    pix = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    model = d["model"]
    with torch.no_grad():
        if policy is None:
            ref = d["hf"].generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                   attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pix),
                                   max_new_tokens=6, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[:, ids.shape[1]:].numpy()
        else:  # sink-to-the-front: transformers gets the rearranged image features by hand
            rule = vj.SinkRule("topk", k=2)
            model = model.clone(visual_tokens=vj.VisualTokenPolicy(policy, rule=rule))
            arr = jit_apply(model, {"params": d["params"]}, ids, pix, output_vision=True).visual_arrangement
            hf = d["hf"]
            vis = hf.model.vision_tower(torch.tensor(pix), output_hidden_states=True)
            feats = hf.model.multi_modal_projector(
                vis.hidden_states[hf.config.vision_feature_layer][:, 1:])
            perm = torch.tensor(np.asarray(arr.permutation), dtype=torch.long)
            feats = torch.gather(feats, 1, perm[..., None].expand(-1, -1, feats.shape[-1]))
            emb = hf.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
            emb[torch.tensor(ids) == VOCAB - 1] = feats.reshape(-1, feats.shape[-1])
            ref = hf.generate(inputs_embeds=emb, attention_mask=torch.tensor(mask),
                              max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0).numpy()
    ours = generate(model, d["params"], ids, mask, pix, 6)
    np.testing.assert_array_equal(np.asarray(ours), ref)
    if policy is None:  # a model in the scanned layout generates the same tokens
        scanned = generate(model.clone(scan_layers=True), vj.stack_layers(d["params"]), ids, mask, pix, 6)
        np.testing.assert_array_equal(np.asarray(scanned), ref)


@pytest.mark.slow
def test_sampling_is_reproducible_and_stops(tiny, rng):
    d = tiny
    c = d["model"].config
    ids, mask = left_pad(_prompts(rng, c, (2, 4, 3)), 16 + c.num_image_tokens)
    pix = rng.standard_normal((3, 3, 28, 28)).astype(np.float32)
    run = lambda key, **kw: np.asarray(generate(d["model"], d["params"], ids, mask, pix, 8,  # noqa: E731
                                                temperature=1.0, top_k=20, top_p=0.9, key=key, **kw))
    a, b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run(jax.random.PRNGKey(2)))
    greedy = np.asarray(generate(d["model"], d["params"], ids, mask, pix, 8))
    stop = int(greedy[0, 2])  # stop on row 0's third token: the rest of row 0 repeats it
    stopped = np.asarray(generate(d["model"], d["params"], ids, mask, pix, 8, (stop,)))
    first = [int(np.argmax(r == stop)) if (r == stop).any() else None for r in greedy]
    for row, f in zip(range(3), first):
        if f is None:
            np.testing.assert_array_equal(stopped[row], greedy[row])
        else:
            np.testing.assert_array_equal(stopped[row, :f + 1], greedy[row, :f + 1])
            assert (stopped[row, f:] == stop).all()


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(filter_logits(logits, top_k=2)).sum() == 2
    kept = np.isfinite(filter_logits(logits, top_p=0.7))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])  # 0.5 < 0.7 <= 0.8
    np.testing.assert_array_equal(np.isfinite(filter_logits(logits, top_p=0.5)), [[True, False, False, False]])


def test_no_recompile_within_a_length_bucket(tiny, rng):
    d = tiny
    c = d["model"].config
    pix = rng.standard_normal((1, 3, 28, 28)).astype(np.float32)
    before = generate._cache_size()
    for n in (1, 6):  # prompts of different lengths, one bucket of 16 + image tokens
        ids, mask = left_pad(_prompts(rng, c, (n,)), 16 + c.num_image_tokens)
        generate(d["model"], d["params"], ids, mask, pix, 4)
    assert generate._cache_size() - before == 1


def test_generate_mode_predicts(tiny):
    d = tiny
    preds = E.predict(d["model"], d["params"], d["tok"], d["records"][:3], eval_cfg(scoring="generate"))
    assert all("generated" in p and isinstance(p["correct"], bool) for p in preds)


MULTI = textwrap.dedent("""
    import json, sys
    import jax, ml_collections
    import vitsink_jax as vj
    from vitsink_jax import eval_lib as E
    from vitsink_jax.data.prompts import TEMPLATES
    from vitsink_jax.data.synthetic import embedded_benchmark
    from vitsink_jax.embedded import embedded_tokenizer
    model, params = vj.load_pretrained(sys.argv[1])
    model = model.clone(visual_tokens=vj.VisualTokenPolicy("front", rule=vj.SinkRule("topk", k=2)))
    recs = embedded_benchmark(seed=0, variants=1, size=28, photos=["chelsea", "coffee", "rocket"])
    cfg = ml_collections.ConfigDict(dict(scoring="loglik", batch_size=3, length_bucket=16,
                                         max_new_tokens=4, templates=dict(TEMPLATES),
                                         mc_format="letter", routing="none"))
    preds = E.predict(model, params, embedded_tokenizer(512), recs, cfg, sys.argv[2])
    print("RESULT", jax.device_count(), json.dumps(preds))
""")


@pytest.mark.slow
def test_scores_equal_on_one_and_eight_devices(tiny, tmp_path):
    path = save(tiny["hf"], tmp_path / "llava")
    out = {}
    for devices, strategy in ((1, "mesh"), (8, "mesh"), (8, "pmap")):
        env = device_env(devices)
        r = subprocess.run([sys.executable, "-c", MULTI, str(path), strategy], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
        n, preds = line.split(" ", 2)[1:]
        assert int(n) == devices
        out[(devices, strategy)] = __import__("json").loads(preds)
    one = out[(1, "mesh")]
    for key, preds in out.items():
        assert [p["prediction"] for p in preds] == [p["prediction"] for p in one], key
        assert [p["sinks"] for p in preds] == [p["sinks"] for p in one] == [2] * len(one)
        np.testing.assert_allclose([p["scores"] for p in preds], [p["scores"] for p in one],
                                   atol=1e-5, err_msg=str(key))


@pytest.mark.slow
def test_cot_routing_feeds_each_item_its_route(tiny, monkeypatch):
    d = tiny
    model, params = to_diysink(d["model"], d["params"], DIYSinkConfig(vj.SinkRule("topk", k=3)))
    recs = d["records"][:3]
    routed = E.predict(model, params, d["tok"], recs, eval_cfg(routing="cot"))
    routes = E.cot_routes(model, params, d["tok"], recs, eval_cfg())
    assert [p["route"] for p in routed] == [r["route"] for r in routes]
    assert all(isinstance(p["cot_image"], str) and isinstance(p["cot_question"], str) for p in routed)
    assert all(isinstance(p["route_parsed"], bool) for p in routed)  # unparsed answers are counted
    # the scores are those of each item's fixed selection (route 0/1/2 = all/sinks/nonsinks)
    for p, rec in zip(routed, recs):
        select = ("all", "sinks", "nonsinks")[p["route"]]
        fixed, _ = to_diysink(d["model"], d["params"], DIYSinkConfig(vj.SinkRule("topk", k=3), select))
        scores, _ = E.loglik_scores(fixed, params, d["tok"], [rec], eval_cfg())
        np.testing.assert_allclose(p["scores"], scores[0], atol=1e-5)
    # generated answers (scoring=generate) go through each item's route too (routes forced to
    # 1, 2, 0: the tiny model's own routing answers parse to 0): the texts of the fixed selections
    forced_routes = [{**r, "route": k} for r, k in zip(routes, (1, 2, 0))]
    monkeypatch.setattr(E, "cot_routes", lambda *a: forced_routes)
    gen = E.predict(model, params, d["tok"], recs, eval_cfg(routing="cot", scoring="generate"))
    prompts = [E.prompt_text(r, TEMPLATES) for r in recs]
    by_route = {}
    for route in (0, 1, 2):
        fixed, _ = to_diysink(d["model"], d["params"],
                              DIYSinkConfig(vj.SinkRule("topk", k=3), ("all", "sinks", "nonsinks")[route]))
        by_route[route] = E.generate_texts(fixed, params, d["tok"], prompts, recs, eval_cfg())
    assert [p["response"] for p in gen] == [by_route[k][i] for i, k in enumerate((1, 2, 0))]
    assert by_route[1][:2] != by_route[0][:2]  # the routes change the texts
    forced = E.loglik_scores(model, params, d["tok"], recs, eval_cfg(), routes=[1, 2, 1])[0]
    sinks_only, _ = to_diysink(d["model"], d["params"], DIYSinkConfig(vj.SinkRule("topk", k=3), "sinks"))
    np.testing.assert_allclose(forced[0], E.loglik_scores(sinks_only, params, d["tok"], recs[:1],
                                                          eval_cfg())[0][0], atol=1e-5)


@pytest.mark.slow
def test_rew_reads_the_training_question_in_every_candidate_row(tiny):
    """DIYSink ReW: every scoring row of an item (one per candidate in the cloze format) marks the
    same question tokens as training's tokenize_conversation for that item (not the template,
    not a candidate), so each row gets the training-time visual weights; the scorer, generation
    and the timing batches pass that mask (a ReW model refuses to run without one)."""
    d = tiny
    model, params = to_diysink(d["model"], d["params"],
                               DIYSinkConfig(vj.SinkRule("topk", k=3), reweight=True))
    fc2 = params["reweighting"]["fc2"]["kernel"]
    params["reweighting"]["fc2"]["kernel"] = jnp.asarray(  # weights that depend on the question
        np.random.default_rng(0).standard_normal(fc2.shape) * 5.0, jnp.float32)
    c, rec, tok = model.config, d["records"][0], d["tok"]
    pix = jnp.asarray(E._pixels(model, rec, {})[None])

    def forward(ids, question):
        return jit_apply(model, {"params": params}, jnp.asarray(ids[None]), pix, output_vision=True,
                         question_mask=jnp.asarray(question[None]))

    for mc_format in ("letter", "cloze"):
        human = human_text(E.prompt_text(rec, TEMPLATES, mc_format))
        ids, _, question = tokenize_conversation(tok, ["human", "gpt"],
                                                 [human, answer_text(rec, mc_format)],
                                                 prompt_format(c))
        want = np.asarray(forward(ids, question).visual_weights[0])
        assert not np.allclose(want, 1.0, atol=1e-3)
        rows = E.scoring_rows(tok, rec, TEMPLATES, prompt_format(c), mc_format)
        assert len(rows) == (4 if mc_format == "cloze" else 1)
        for row_ids, _, _, _, row_q in rows:
            np.testing.assert_array_equal(row_ids[row_q], ids[question])      # the same tokens
            np.testing.assert_array_equal(np.flatnonzero(row_q), np.flatnonzero(question))
            np.testing.assert_allclose(forward(row_ids, row_q).visual_weights[0], want, atol=1e-6)
    scores, _ = E.loglik_scores(model, params, tok, [rec], eval_cfg(mc_format="cloze"))
    for k, (row_ids, targets, _, _, row_q) in enumerate(rows):
        lp = np.asarray(jax.nn.log_softmax(forward(row_ids, row_q).logits[0], -1))
        want = sum(lp[t, targets[t]] for t in np.flatnonzero(targets >= 0))
        np.testing.assert_allclose(scores[0][k], want, atol=1e-4)
    with pytest.raises(ValueError, match="needs question_mask"):
        model.apply({"params": params}, jnp.asarray(rows[0][0][None]), pix)
    texts = E.generate_texts(model, params, tok, [E.prompt_text(rec, TEMPLATES)], [rec], eval_cfg())
    assert isinstance(texts[0], str)
    batch = E.prompt_batch(model, tok, d["records"][:2], eval_cfg())
    assert batch["question"].sum() == batch["left_question"].sum() > 0
    assert np.isfinite(np.asarray(timing.prefill_call(model, params, batch)())).all()


def test_greedy_generation_matches_transformers_on_a_medium_checkpoint(tmp_path, rng):
    """A medium LLaVA (CLIP 112 px -> 64 visual tokens, 4 x 192; LLaMA 4 x 256, GQA, 1024
    tokens): 12 greedy tokens for two left-padded prompts equal transformers' generate."""
    vision = transformers.CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                           num_attention_heads=4, image_size=112, patch_size=14)
    text = llama_config(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=1024)
    hf = build(transformers.LlavaForConditionalGeneration,
               llava_config(vision=vision, text=text, image_token_index=1023))
    model, params = vj.load_pretrained(save(hf, tmp_path / "medium"))
    c = model.config
    rows = [np.concatenate([[1], rng.integers(3, 1000, n), [1023] * c.num_image_tokens,
                            rng.integers(3, 1000, 5)]) for n in (4, 9)]
    ids, mask = left_pad(rows, 16 + c.num_image_tokens)
    pix = rng.standard_normal((2, 3, 112, 112)).astype(np.float32)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pix), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(np.asarray(generate(model, params, ids, mask, pix, 12)), ref)


# ------------------------------------------------------- shared-prefix scoring ---

@pytest.mark.parametrize("variant", ["stock", "front", "sinks-original", "nonsinks", "diysink", "registers"])
def test_items_sharing_a_photo_are_scored_from_its_prefix_cache(tiny, variant):
    """Items that show the same photo (three of four here) are scored from one prefill of their
    shared prompt prefix, image included: the scores equal the full rows' for the stock model,
    sink-to-the-front (sequential and original positions, sink-only / non-sink-only inputs),
    a DIYSink model without ReW and test-time registers."""
    from conftest import check_shared_prefix_scoring
    from vitsink_jax.interventions import Interventions, TestTimeRegisters

    d, rule = tiny, vj.SinkRule("topk", k=2)
    model, params = d["model"], d["params"]
    if variant == "diysink":
        model, params = to_diysink(model, params, DIYSinkConfig(rule), init="scratch")
    elif variant == "registers":
        model = model.clone(interventions=Interventions(registers=TestTimeRegisters(((0, 1),))))
    elif variant != "stock":
        select, positions = {"front": ("all", "sequential"), "sinks-original": ("sinks", "original"),
                             "nonsinks": ("nonsinks", "sequential")}[variant]
        model = model.clone(visual_tokens=vj.VisualTokenPolicy("front", select, positions, rule=rule))
    check_shared_prefix_scoring(model, params, d["tok"], d["records"][:4], eval_cfg())


def test_prefix_groups_and_units():
    """Rows group by photo with the prefix they share (never past a scored position); a prefix
    that would not reach a text token past the image gives no plan; units hold at most
    ``capacity`` rows and whole groups; shapes are padded to powers of two groups and length
    buckets."""
    from vitsink_jax import prefix_sharing as PS

    img = 9

    def row(ids, first_target=None):
        ids = np.asarray(ids, np.int32)
        targets = np.full(len(ids), -1, np.int32)
        if first_target is not None:
            targets[first_target:-1] = ids[first_target + 1:]
        return ids, targets, np.full(1, -1, np.int32), -1, np.zeros(len(ids), bool)

    rows = [(0, row([1, img, img, 2, 3, 4])), (1, row([1, img, img, 2, 5])),
            (2, row([1, img, img, 2, 3, 4, 6], first_target=5)), (3, row([1, img, img, 7, 8]))]
    keys = ["a", "a", "a", "b"]
    groups = PS.prefix_groups(rows, keys, img, capacity=4)
    assert groups == [PS.Group(4, (0, 1, 2)), PS.Group(4, (3,))]
    assert PS.prefix_groups(rows, keys, img, capacity=2) == [PS.Group(4, (0, 1)), PS.Group(5, (2,)),
                                                           PS.Group(4, (3,))]
    late = [(0, row([1, 2, img, 3])), (1, row([1, 4, img, 3]))]  # the image after the question
    assert PS.prefix_groups(late, ["a", "a"], img, capacity=4) is None
    right_after = [(0, row([1, img, img, 5, 6])), (1, row([1, img, img, 7, 8]))]  # no text between
    assert PS.prefix_groups(right_after, ["a", "a"], img, capacity=4) is None
    units = PS.pack_units(groups, rows, capacity=3)
    assert [u.groups for u in units] == [(groups[1],), (groups[0],)]  # shorter prefix first
    assert units[1].rows == [0, 1, 2] and units[1].of_row == (0, 0, 0)
    assert PS.batch_shapes(units, rows, 4, capacity=3) == {"groups": 1, "prefix": 4, "suffix": 4}
    (both,) = PS.pack_units(groups, rows, capacity=4)
    assert both.groups == (groups[1], groups[0]) and both.of_row == (0, 1, 1, 1)
    assert PS.batch_shapes([both], rows, 4, capacity=4)["groups"] == 2
    assert PS.batch_shapes([PS.Unit(tuple(groups) * 2, ())], rows, 4, capacity=8)["groups"] == 4


# ------------------------------------------- one compiled scorer per shape, batches packed ---

def _yes_no(rec: dict) -> dict:
    return {**rec, "index": f"{rec['index']}-yn", "kind": "yesno", "options": [], "answer": "Yes",
            "question": f"{rec['question']} Is it {rec['options'][0]}?"}


def _planned_shapes(d, recs: list, cfg) -> set:
    """The padded (groups, prefix, suffix) shapes loglik_scores runs ``recs`` in (one device)."""
    from vitsink_jax import prefix_sharing as PS

    c = d["model"].config
    rows = sorted(((i, r) for i, rec in enumerate(recs)
                   for r in E.scoring_rows(d["tok"], rec, TEMPLATES, prompt_format(c))),
                  key=lambda row: len(row[1][0]))
    groups = PS.prefix_groups(rows, [r["image"] for r in recs], c.image_token_index, cfg.batch_size)
    return {tuple(PS.batch_shapes([u], rows, cfg.length_bucket, cfg.batch_size).values())
            for u in PS.pack_units(groups, rows, cfg.batch_size)}


@pytest.mark.slow
def test_the_scorer_compiles_once_per_shape_and_keeps_record_order(tiny):
    """loglik_scores reuses one jitted scorer per (model, strategy, mesh): a benchmark whose
    units fall in several padded shapes (mc and yes/no items sharing photos, prefixes and
    suffixes of several lengths) compiles at most once per shape, the same benchmark again
    compiles nothing, and later calls (fewer items, one record at a time) compile only shapes
    not met yet. The scores come back in record order and equal each record scored alone."""
    d = tiny
    recs = [r for rec in d["records"] for r in (rec, _yes_no(rec))]
    cfg = eval_cfg(length_bucket=4)
    shapes = _planned_shapes(d, recs, cfg)
    every = shapes.union(_planned_shapes(d, recs[1::2], cfg),
                         *(_planned_shapes(d, [rec], cfg) for rec in recs))
    assert len(shapes) > 1
    compiles = []

    def listen(event, seconds, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(seconds)

    E._shared_scorer.cache_clear()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        scores, sinks = E.loglik_scores(d["model"], d["params"], d["tok"], recs, cfg)
        first = len(compiles)
        again, _ = E.loglik_scores(d["model"], d["params"], d["tok"], recs, cfg)
        second = len(compiles) - first
        yes_no, _ = E.loglik_scores(d["model"], d["params"], d["tok"], recs[1::2], cfg)
        alone = [E.loglik_scores(d["model"], d["params"], d["tok"], [rec], cfg) for rec in recs]
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert 1 <= first <= len(shapes) and second == 0, (first, second, sorted(shapes))
    assert len(compiles) <= len(every), (len(compiles), sorted(every))
    assert E._shared_scorer.cache_info().currsize == 1
    assert again == scores
    assert [len(s) for s in scores] == [4 if r["kind"] == "mc" else 2 for r in recs]
    np.testing.assert_allclose(yes_no, scores[1::2], atol=1e-5)
    for s, k, (s1, k1) in zip(scores, sinks, alone):
        np.testing.assert_allclose(s, s1[0], atol=1e-5)
        assert k == k1[0]
