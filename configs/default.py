"""Default evaluate.py config: the embedded benchmark on the embedded default model, stock
visual-token order vs sink-to-the-front side by side (the README's main job).

Until real weights ship (see the README's roadmap), the embedded default is a small LLaVA
(CLIP-style tower + LLaMA-style LM) with seeded random weights, written in Hugging Face layout and
loaded back through the converter, so the whole pipeline runs offline.
"""

import ml_collections

from vitsink_jax.diysink import IMAGE_PROMPT, QUESTION_PROMPT
from vitsink_jax.embedded import embedded_shape
from vitsink_jax.eval_lib import TEMPLATES


def get_config():
    c = ml_collections.ConfigDict()
    c.mode = "benchmark"   # benchmark | analyze | vit | demo (see evaluate.py)
    c.seed = 0
    c.checkpoint = ""      # a Hugging Face LLaVA folder; "" = build the embedded default in workdir
    c.images = ""          # a folder of images; "" = real photos bundled with scikit-image
    c.dtype = "float32"    # compute dtype: float32 | bfloat16
    c.top_k = 5            # demo: highest-norm tokens per image; analyze: logit-lens words (F4)

    # analyze mode: ViT-sink rule (see vitsink_jax.sinks.detect.SinkRule)
    c.sink = ml_collections.ConfigDict(dict(rule="threshold", tau=100.0, k=4, max_fraction=0.1,
                                            min_ratio=2.0))
    c.vit_layer = -2       # vit mode: the hidden state analysed (LLaVA's feature-layer convention)
    c.llm_tau = 20.0       # VAR threshold on |h[d]| / RMS(h); note it is at most sqrt(hidden size)
    c.llm_sink_dims = ()   # the LLM's sink dims (LLaVA-1.5-7B: (1415, 2533)); () = discover
    # F4: the object word of each image (file stem -> word) for the logit-lens hit rate
    c.object_words = ml_collections.ConfigDict(dict(astronaut="astronaut", chelsea="cat",
                                                    coffee="coffee", rocket="rocket"))
    c.bucket_edges = (0.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 150.0, 10000.0)

    # benchmark mode (vitsink_jax.eval_lib): which benchmark, how it is scored, which variants
    c.benchmark = ml_collections.ConfigDict()
    c.benchmark.name = "embedded"   # embedded | mmstar | cvbench | mme | pope | mathvista |
                                    # scienceqa | gqa | generic
    c.benchmark.file = ""           # VLMEvalKit .tsv or lmms-eval .json/.jsonl; "" = embedded
    c.benchmark.data_dir = ""       # where the tfds builder is written; "" = workdir/tfds
    c.benchmark.limit = 0           # score only the first N items (0 = all)
    c.benchmark.variants = 2        # embedded benchmark: overlays per photo (3 questions each)
    c.benchmark.image_size = 224    # embedded benchmark: stored image side in pixels
    # visual-token variants compared side by side: "order[+select[+positions]]", e.g. "front",
    # "end", "none+sinks" (sink-only input), "none+nonsinks", "front+all+original"
    c.variants = ("none", "front")
    c.eval = ml_collections.ConfigDict()
    c.eval.scoring = "loglik"       # loglik | generate (open questions always generate)
    c.eval.batch_size = 8           # rows per forward (rounded up to a multiple of the devices)
    c.eval.length_bucket = 32       # sequences padded to a multiple of this (bounds recompiles)
    c.eval.max_new_tokens = 8       # generation
    c.eval.parallel = "mesh"        # mesh | pmap
    c.eval.templates = ml_collections.ConfigDict(dict(TEMPLATES))
    c.eval.routing = "none"         # none | cot (DIYSink CoT routing: per-item token selection)
    c.eval.cot_image_prompt = IMAGE_PROMPT
    c.eval.cot_question_prompt = QUESTION_PROMPT

    c.distributed = ml_collections.ConfigDict(dict(coordinator="", num_processes=1, process_id=0,
                                                   local_device_count=0))  # multi-host runs
    c.embedded = embedded_shape()  # shape of the embedded default model
    return c
