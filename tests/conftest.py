"""Shared helpers: tiny random Hugging Face models built offline and saved to tmp dirs."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest


# the CLIs the tests start compile without the persistent cache (it would write into the
# user's ~/.cache, and writing each of the suite's many one-off programs costs more than the
# few shared ones save: a compile-heavy loop ran 1.5x slower with an empty cache);
# tests/test_speed.py tests the cache in a folder of its own
os.environ.setdefault("VITSINK_JAX_CACHE", "off")

# the suite's programs are tiny and run a few times each, so XLA:CPU compiles them for compile
# time: LLVM without optimization (-O0, no expensive passes) cuts a test's CPU by ~30% (a
# Gemma 3 parity test 25 -> 18 s, a training resume 42 -> 30 s); numerics stay IEEE float32
# (every comparison in the suite is between programs built alike, or against a tolerance).
# Set before jax is imported; the CLIs the tests start inherit it (device_env for the ones
# that set their own device count)
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def device_env(devices: int = 0, **extra) -> dict:
    """The environment of a subprocess on the CPU with ``devices`` host devices (0: the
    platform's default), compiling as the suite does (:data:`FAST_COMPILE`), plus ``extra``."""
    flags = FAST_COMPILE + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, **extra}

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()

IMAGE_TOKEN = 99
VOCAB = 128


def clip_vision_config(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=28, patch_size=7, projection_dim=16)
    return transformers.CLIPVisionConfig(**{**base, **kw})


def siglip_vision_config(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=28, patch_size=7)
    return transformers.SiglipVisionConfig(**{**base, **kw})


def dinov2_config(registers: int = 0, **kw):
    base = dict(hidden_size=32, mlp_ratio=2, num_hidden_layers=3, num_attention_heads=4,
                image_size=28, patch_size=7, layerscale_value=0.5)
    if registers:
        return transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **{**base, **kw})
    return transformers.Dinov2Config(**{**base, **kw})


def llama_config(**kw):
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256)
    return transformers.LlamaConfig(**{**base, **kw})


def qwen2_config(**kw):
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                tie_word_embeddings=True)
    return transformers.Qwen2Config(**{**base, **kw})


def phi_config(**kw):
    """Phi-2: partial rotary (0.5), q/k LayerNorm, GQA."""
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                partial_rotary_factor=0.5, qk_layernorm=True)
    return transformers.PhiConfig(**{**base, **kw})


def phi3_config(**kw):
    """Phi-3: fused qkv / gate_up, longrope (long factors past 8 positions), partial rotary
    (0.75), a sliding window shorter than the test sequences."""
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                partial_rotary_factor=0.75, sliding_window=5, pad_token_id=0,
                original_max_position_embeddings=8)
    base.update(kw)
    n = int(base["hidden_size"] // base["num_attention_heads"] * base["partial_rotary_factor"]) // 2
    base.setdefault("rope_scaling", dict(type="longrope", short_factor=[1.0 + 0.1 * i for i in range(n)],
                                         long_factor=[2.0 + 0.3 * i for i in range(n)]))
    return transformers.Phi3Config(**base)


def gemma3_text_config(**kw):
    """Gemma 3 text: local / global layers alternating (pattern 2), a window of 5 slots, linear
    RoPE scaling on the global layers, q/k norms, head_dim 16 with query_pre_attn_scalar 24."""
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=256,
                sliding_window=5, query_pre_attn_scalar=24, sliding_window_pattern=2,
                rope_scaling={"rope_type": "linear", "factor": 4.0}, pad_token_id=0)
    return transformers.Gemma3TextConfig(**{**base, **kw})


def gemma3_config(text=None, **kw):
    """Gemma 3 LVLM: a 4 x 4 SigLIP patch grid pooled 2 x 2 into 4 visual tokens."""
    base = dict(mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=IMAGE_TOKEN - 2,
                eoi_token_index=IMAGE_TOKEN - 1)
    return transformers.Gemma3Config(text_config=text or gemma3_text_config(sliding_window=7),
                                     vision_config=siglip_vision_config(vision_use_head=False),
                                     **{**base, **kw})


def internvl_vision_config(**kw):
    """InternViT: 4 x 4 patches, q/k RMSNorm, LayerScale."""
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=28, patch_size=7, use_qk_norm=True, layer_scale_init_value=0.5)
    return transformers.InternVLVisionConfig(**{**base, **kw})


def internvl_config(text=None, **kw):
    """InternVL: InternViT's 4 x 4 patches pixel-shuffled into 4 visual tokens per tile, Qwen2."""
    base = dict(image_token_id=IMAGE_TOKEN, image_seq_length=4)
    return transformers.InternVLConfig(vision_config=internvl_vision_config(),
                                       text_config=text or qwen2_config(), **{**base, **kw})


def qwen2_5_vl_config(**kw):
    """Qwen2.5-VL: 4 px patches merged 2 x 2 (8 px per visual token), windows of 16 px (2 x 2
    visual tokens) with block 1 attending fully, a Qwen2 LLM whose multimodal RoPE sections
    (2, 3, 3) turn head_dim 16; the fixed-size pipelines' images are 16 px squares (4 tokens)."""
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=64,
                  patch_size=4, window_size=16, fullatt_block_indexes=[1])
    base = dict(image_token_id=IMAGE_TOKEN, vision_start_token_id=IMAGE_TOKEN - 2,
                vision_end_token_id=IMAGE_TOKEN - 1)
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **{**base, **kw})
    config.vitsink_image_size = 16
    return config


def qwen_hf_inputs(ids, pixels) -> dict:
    """What transformers' Qwen2.5-VL takes for our inputs: the processor's flattened patches of
    pixels [N, C, H, W], each image's (1, H / 4, W / 4) grid, and the image tokens' type ids."""
    proc = transformers.Qwen2VLImageProcessorPil()
    flat = np.concatenate([proc.patchify(p, 4, 2, 2)[0] for p in np.asarray(pixels)])
    n, _, h, w = pixels.shape
    return dict(pixel_values=flat, image_grid_thw=np.asarray([[1, h // 4, w // 4]] * n),
                mm_token_type_ids=(np.asarray(ids) == IMAGE_TOKEN).astype(np.int32))


def llava_config(vision=None, text=None, **kw):
    kw.setdefault("image_token_index", IMAGE_TOKEN)
    return transformers.LlavaConfig(vision_config=vision or clip_vision_config(),
                                    text_config=text or llama_config(), **kw)


def build(model_cls, config, seed=0):
    """A transformers model with random weights, eval mode, eager attention (returns weights)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():  # HF initialises some tensors to exact 0/1; perturb so every param matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def save(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return path


def save_bin(model, path):
    """A ``pytorch_model.bin`` checkpoint (transformers 5 only writes safetensors).

    Keys are the in-memory state_dict names (``model.language_model...``), a third key spelling
    next to the two that save_pretrained files use.
    """
    save(model, path)
    (path / "model.safetensors").unlink()
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def assert_close(ours, ref, tol=1e-4, what=""):
    """max |ours - ref| <= tol * max(1, max |ref|), the project's fp32 parity rule."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    err = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    bound = tol * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    PARITY[test] = max(PARITY.get(test, 0.0), err / (bound / tol))
    assert err <= bound, f"{what}: max|diff| {err:.3e} > {bound:.3e}"
    return err


PARITY: dict = {}  # test id -> worst max|diff| / max(1, max|ref|) seen by assert_close


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attaches the test's worst parity error to its call report (so it reaches the xdist
    controller)."""
    outcome = yield
    if call.when == "call" and item.nodeid in PARITY:
        outcome.get_result().user_properties.append(("parity", PARITY[item.nodeid]))


# the suite's longest tests (seconds on 2 cores under `-n 2`, longest first): they start first
LONGEST = ("test_two_processes_with_jax_distributed_then_resume_on_another_count",  # 367
           "test_interventions_side_by_side",                                       # 158
           "test_train_and_evaluate_in_a_gs_workdir_match_a_local_one",             # 151
           "test_mini_study_recipe_publish_then_the_study_main_job",                # 131
           "test_one_device_mesh_and_pmap_agree",                                   # 130
           "test_benchmark_on_two_processes_equals_one",                            # 116
           "test_sharded_evaluation_equals_replicated",                             # 115
           "test_tinyllava_recipe_trains_and_scores_scaled_down",                   # 104
           "test_qwen_checkpoint_runs_evaluate_modes",                              # 102
           "test_gemma3_checkpoint_runs_evaluate_modes",                            # 96
           "test_gemma3_internvl_and_qwen2_5_vl_run_sharded_on_8_devices")          # 88


def pytest_collection_modifyitems(items):
    """Two queues that each start with their share of the long tests: the tests of
    :data:`LONGEST` in that order, then the other slow-marked ones, dealt alternately to the two
    halves of the list, each half then filled with the other tests in file order (a module's
    tests stay together, sharing its fixtures). ``--dist worksteal`` (pyproject's addopts)
    gives each worker one contiguous half; a worker that runs out of tests takes the last half
    of the other's queue, its short tests, so the two finish within a short test of each other."""
    def rank(item):
        name = item.originalname or item.name
        return LONGEST.index(name) if name in LONGEST else len(LONGEST)

    slow = sorted((i for i in items if i.get_closest_marker("slow")), key=rank)  # stable
    rest = [i for i in items if not i.get_closest_marker("slow")]
    first, second = slow[0::2], slow[1::2]
    fill = max(0, len(items) // 2 - len(first))
    items[:] = first + rest[:fill] + second + rest[fill:]


def pytest_sessionstart(session):
    session.config._vitsink_start = time.time()


def pytest_terminal_summary(terminalreporter):
    """Prints the worst relative parity error per test file (the figure the closing notes and
    the README's family table quote); with ``VITSINK_JAX_SUITE_JSON=FILE`` also writes the run's
    summary there (tests passed / failed / skipped, seconds, parity per file, machine and date:
    what benchmarks/readme.py puts in the README)."""
    stats = terminalreporter.stats
    by_file: dict = {}
    for report in stats.get("passed", []) + stats.get("failed", []):
        for key, value in getattr(report, "user_properties", ()):
            if key == "parity":
                f = report.nodeid.split("::")[0]
                by_file[f] = max(by_file.get(f, 0.0), value)
    if by_file:
        terminalreporter.write_sep("-", "parity vs transformers: worst max|diff| / max(1, max|ref|)")
        for f, err in sorted(by_file.items()):
            terminalreporter.write_line(f"{f}: {err:.2e}")
    out = os.environ.get("VITSINK_JAX_SUITE_JSON")
    if out and not hasattr(terminalreporter.config, "workerinput"):
        import json

        from vitsink_jax.provenance import machine

        count = lambda k: len([r for r in stats.get(k, []) if getattr(r, "when", "call") == "call"])  # noqa: E731
        summary = {"passed": count("passed"), "failed": count("failed"), "skipped": len(stats.get("skipped", [])),
                   "seconds": round(time.time() - terminalreporter.config._vitsink_start, 1),
                   "command": "python -m pytest -q -n 2 tests", "parity": dict(sorted(by_file.items())),
                   "machine": machine()}
        with open(out, "w") as f:
            f.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")


def jit_apply(model, variables, *args, **kw):
    """``model.apply(variables, *args, **kw)`` compiled as one program: the keyword arguments
    that are arrays are traced, the others (flags such as ``output_attentions``, ``method``,
    ``mutable``) fixed. Unjitted, the suite's tiny models run op by op, each op compiled on its
    own: the Qwen2.5-VL tower test took 12 s that way and 1.6 s jitted."""
    import functools

    import jax

    arrays = {k: v for k, v in kw.items() if isinstance(v, (jax.Array, np.ndarray))}
    fixed = {k: v for k, v in kw.items() if k not in arrays}
    return jax.jit(functools.partial(model.apply, **fixed))(variables, *args, **arrays)


def compare_causal_lm(hf, path, ids, mask=None, positions=None, full=True, **options):
    """Loads the transformers causal LM ``hf`` saved to ``path`` and compares logits (and hidden
    states / attentions when ``full``) on non-pad positions; ``options`` are module fields for
    load_pretrained. Returns the logits' max |diff|."""
    import jax.numpy as jnp

    import vitsink_jax as vj

    model, params = vj.load_pretrained(save(hf, path), **options)
    m = None if mask is None else jnp.asarray(mask)
    out = jit_apply(model, {"params": params}, jnp.asarray(ids), attention_mask=m,
                    output_hidden_states=full, output_attentions=full)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                 output_hidden_states=full, output_attentions=full)
    keep = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    err = assert_close(np.asarray(out.logits)[keep], t2n(ref.logits)[keep], what="logits")
    if full:
        assert len(out.hidden_states) == len(ref.hidden_states)
        for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            assert_close(np.asarray(a)[keep], t2n(b)[keep], what=f"hidden_states[{i}]")
        for i, (a, b) in enumerate(zip(out.attentions, ref.attentions)):
            qk = keep[:, None, :, None] & keep[:, None, None, :]
            a, b = np.asarray(a), t2n(b)
            assert_close(np.where(qk, a, 0), np.where(qk, b, 0), what=f"attentions[{i}]")
    return err


def check_generation_and_scan(hf, model, params, batch: dict, ref_logits, new_tokens: int, **hf_inputs):
    """An LVLM ``model`` against the transformers model ``hf`` on ``batch`` (ids, mask, pixels;
    left-padded rows): greedy generation with the KV cache equals ``hf.generate`` token for token,
    and the scanned layout gives ``ref_logits`` at the non-pad positions. ``hf_inputs``: extra
    generate inputs (Gemma 3's token_type_ids); they may replace ``pixel_values`` (Qwen2.5-VL's
    flattened patches)."""
    import jax.numpy as jnp

    import vitsink_jax as vj
    from vitsink_jax.generate import generate

    ids, mask, pixels = batch["ids"], batch["mask"], batch["pixels"]
    hf_inputs = {"pixel_values": pixels, **hf_inputs}
    with torch.no_grad():
        gen = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                          **{k: torch.tensor(v) for k, v in hf_inputs.items()})
    np.testing.assert_array_equal(np.asarray(generate(model, params, ids, mask, pixels, new_tokens)),
                                  gen[:, ids.shape[1]:].numpy())
    scanned = model.clone(scan_layers=True).apply(
        {"params": vj.stack_layers(params)}, jnp.asarray(ids), jnp.asarray(pixels),
        attention_mask=jnp.asarray(mask))
    keep = mask.astype(bool)
    assert_close(np.asarray(scanned.logits)[keep], t2n(ref_logits)[keep], what="scanned logits")


def check_diysink(d: dict, hf_forward, hf_class, tmp_path, init: str):
    """DIYSink on an LVLM fixture ``d`` (model, params, ids, pixels, mask): with ``init="copy"``
    (both projectors equal) it gives the stock model's sink-to-the-front logits; with a fresh
    sink projector it round-trips through config.json bit for bit, and transformers' ``hf_class``
    reads the checkpoint's non-sink path as its projector (``hf_forward(d, hf)``: the reference
    forward on the fixture's batch)."""
    import jax
    import jax.numpy as jnp

    import vitsink_jax as vj
    from vitsink_jax.config import DIYSinkConfig
    from vitsink_jax.diysink import to_diysink
    from vitsink_jax.sinks.fuse import VisualTokenPolicy

    rule = vj.SinkRule("topk", k=2)
    model, params = to_diysink(d["model"], d["params"], DIYSinkConfig(rule), init=init)
    batch = (jnp.asarray(d["ids"]), jnp.asarray(d["pixels"]))
    ours = jit_apply(model, {"params": params}, *batch, attention_mask=jnp.asarray(d["mask"])).logits
    if init == "copy":
        front = d["model"].clone(visual_tokens=VisualTokenPolicy("front", rule=rule))
        np.testing.assert_allclose(ours, jit_apply(front, {"params": d["params"]}, *batch,
                                                   attention_mask=jnp.asarray(d["mask"])).logits, atol=1e-5)
        return
    out = vj.save_pretrained(model, params, tmp_path / "diy")
    back, loaded = vj.load_pretrained(out)
    assert type(back) is type(d["model"]) and back.config.diysink == DIYSinkConfig(rule)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    keep = d["mask"].astype(bool)
    assert_close(t2n(hf_forward(d, hf_class.from_pretrained(str(out)).eval()).logits)[keep],
                 t2n(hf_forward(d).logits)[keep], what="transformers on the DIYSink checkpoint")


def t2n(t):
    return t.detach().float().numpy()


def random_ids(rng, batch, length, low=3, high=VOCAB - 2):
    ids = rng.integers(low, high, size=(batch, length))
    ids[ids == IMAGE_TOKEN] = low
    return ids


@pytest.fixture
def rng():
    return np.random.default_rng(0)


INTERNVL_TOKENS = {"chat_start": "<|im_start|>", "chat_end": "<|im_end|>", "start_image_token": "<img>",
                   "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}
QWEN_TOKENS = {"chat_start": "<|im_start|>", "chat_end": "<|im_end|>", "vision_start": "<|vision_start|>",
               "vision_end": "<|vision_end|>", "image_token": "<|image_pad|>"}
GEMMA3_TOKENS = {"chat_start": "<start_of_turn>", "chat_end": "<end_of_turn>",
                 "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                 "image_token": "<image_soft_token>"}


def evaluate_config(tmp_path, checkpoint):
    """configs/default.py's evaluate.py config for ``checkpoint``, with a folder of one photo
    (skimage's coffee) as its images."""
    import importlib.util
    from pathlib import Path

    from PIL import Image
    from skimage import data

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(data.coffee()).save(images / "coffee.png")
    spec = importlib.util.spec_from_file_location(
        "default_config", Path(__file__).resolve().parents[1] / "configs" / "default.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.update(dict(checkpoint=str(checkpoint), images=str(images)))
    return cfg


def check_shared_prefix_scoring(model, params, tok, records: list, cfg) -> list:
    """Benchmark scoring of ``records`` (several items per photo) through the
    shared-prefix scorer (each photo's prompt prefix prefilled once, the items continuing from
    its KV cache) equals the full-row scorer: the same sink counts, scores within 1e-5.
    Returns the shared scores."""
    import ml_collections

    from vitsink_jax import eval_lib, prefix_sharing

    fmt = eval_lib.prompt_format(model.config, tok)
    rows = [(i, r) for i, rec in enumerate(records)
            for r in eval_lib.scoring_rows(tok, rec, cfg.templates, fmt, cfg.mc_format)]
    groups = prefix_sharing.prefix_groups(rows, [r["image"] for r in records],
                                          model.config.image_token_index, cfg.batch_size)
    assert prefix_sharing.shares_prefixes(model) and groups is not None
    assert any(len(g.rows) > 1 for g in groups)
    shared, shared_sinks = eval_lib.loglik_scores(model, params, tok, records, cfg)
    full_rows = ml_collections.ConfigDict({**cfg.to_dict(), "share_prefixes": False})
    full, full_sinks = eval_lib.loglik_scores(model, params, tok, records, full_rows)
    assert shared_sinks == full_sinks
    np.testing.assert_allclose(np.array(shared), np.array(full), atol=1e-5)
    return shared


def train_diysink_briefly(folder, workdir):
    """train.py's DIYSink recipe (configs/diysink.py, stage 1: the two projectors) for two
    steps of 4 rows from the checkpoint ``folder`` (with its tokenizer): the loss is finite and
    the export loads back as the same family with its DIYSink block. Returns the summary."""
    import importlib.util
    from pathlib import Path

    import vitsink_jax as vj

    from vitsink_jax import trainer

    root = Path(__file__).resolve().parents[1]

    spec = importlib.util.spec_from_file_location("diysink_recipe", root / "configs" / "diysink.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    cfg.update(dict(checkpoint=str(folder), steps=2, batch_size=4, checkpoint_every=2))
    cfg.data.variants = 1
    summary = trainer.train(cfg, Path(workdir))
    assert np.isfinite(summary["last_loss"]), summary
    before, _ = vj.load_pretrained(folder)
    after, params = vj.load_pretrained(Path(workdir) / "export")
    assert type(after) is type(before) and after.config.diysink is not None
    assert "multi_modal_projector_sink" in params
    return summary


def hf_tokenizer(family: str, path, corpus: list):
    """A small tokenizer of a checkpoint family, BPE-trained offline on ``corpus``, saved to
    ``path`` and read back as a checkpoint's is (``load_tokenizer``); ``<image>`` is added.

    ``llama``: LLaMA's layout (transformers' LlamaTokenizer: ``▁`` for spaces, Metaspace, the
    256 byte-fallback pieces, ``<unk> <s> </s>``, BOS added by the tokenizer); ``qwen2``: Qwen2's (byte-level BPE after
    Qwen2's split regex, ``<|endoftext|>``, no BOS); ``gemma``: Gemma 3's (LLaMA's pieces with
    ``<pad> <eos> <bos> <unk>``, BOS added, no prefix space, the turn and image tokens, ``boi_token`` /
    ``eoi_token`` / ``image_token`` named as Gemma3Processor reads them; no ``<image>``);
    ``internvl``: Qwen2's with InternVL's ``<img> </img> <IMG_CONTEXT> <video>`` named as
    InternVLProcessor reads them and ChatML's ``<|im_start|> <|im_end|>``; no ``<image>``;
    ``qwen2_5_vl``: Qwen2's with ChatML's and the vision tokens (:data:`QWEN_TOKENS`); no ``<image>``.
    Digits are trained as single pieces, as the families split numbers, so `` 2`` is a space
    token then ``2``.
    """
    import json
    import re

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from vitsink_jax.data.tokenizer import load_tokenizer

    if family in ("llama", "gemma"):
        pre = pre_tokenizers.Metaspace()
        specials = ["<unk>", "<s>", "</s>"] if family == "llama" else ["<pad>", "<eos>", "<bos>", "<unk>"]
        specials += [f"<0x{b:02X}>" for b in range(256)]
        alphabet = []
    else:
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                use_regex=False)])
        specials, alphabet = ["<|endoftext|>"], pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE(unk_token=None if family in ("qwen2", "internvl", "qwen2_5_vl") else "<unk>"))
    bpe.pre_tokenizer = pre
    bpe.train_from_iterator([re.sub(r"\d", " ", t) for t in corpus],  # digits: no merges
                            trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                initial_alphabet=alphabet + list("0123456789"),
                                                show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    cls = {"llama": transformers.LlamaTokenizerFast, "qwen2": transformers.Qwen2TokenizerFast,
           "internvl": transformers.Qwen2TokenizerFast, "qwen2_5_vl": transformers.Qwen2TokenizerFast,
           "gemma": transformers.GemmaTokenizer}[family]
    tok = cls(vocab=model["vocab"], merges=merges)
    tok.add_bos_token = family in ("llama", "gemma")  # as LLaMA's and Gemma's tokenizers do
    named = {"gemma": GEMMA3_TOKENS, "internvl": INTERNVL_TOKENS, "qwen2_5_vl": QWEN_TOKENS}.get(family)
    if named:
        tok.add_special_tokens({"additional_special_tokens": list(named.values())})
    tok.save_pretrained(str(path))
    if named:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        cfg["extra_special_tokens"] = {k: v for k, v in named.items() if not k.startswith("chat")}
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
        return load_tokenizer(path)
    tok = load_tokenizer(path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


@pytest.fixture(scope="session")
def benchmark_checkpoint(tmp_path_factory):
    """A tiny random LLaVA (transformers' layout, 256 positions) with the embedded tokenizer:
    a benchmark-mode run on it compiles little."""
    from vitsink_jax.embedded import embedded_tokenizer

    hf = build(transformers.LlavaForConditionalGeneration,
               llava_config(text=llama_config(vocab_size=512), image_token_index=511, vision_feature_layer=-1))
    folder = save(hf, tmp_path_factory.mktemp("bench") / "llava")
    embedded_tokenizer(512).save_pretrained(str(folder))
    return folder
