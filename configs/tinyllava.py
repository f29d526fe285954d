"""The paper's TinyLLaVA DIYSink recipes (PAPER_NOTES s.7-8), shared by
configs/tinyllava_0p5b_diysink.py and configs/tinyllava_3b_diysink.py (``--config.diysink.enabled=False``
gives the single-MLP baseline with the identical recipe).

TinyLLaVA Factory's published scripts (scripts/train/*.sh): pretrain the connector only (lr 1e-3,
global batch 256), then fine-tune connector + LLM (lr 2e-5, global batch 128), the vision tower
frozen; one epoch each, warmup ratio 0.03, cosine decay, weight decay 0, max length 2048 (rows
cut there, as their trainer truncates to model_max_length), stage 1 in the plain pretrain
template (the image, then the caption and a newline), the loss averaged as their Trainer averages
it (the token mean of each device's micro-batch of 32 / 8 rows, then the mean of those), bf16
(TinyLLaVA's Phi-2 scripts train in fp16, its Qwen2 ones in bf16: bf16 here for both, the half
precision TPUs compute in, with no loss scaling; a deliberate difference), data LLaVA-558K (pretrain) / LLaVA-665K (finetune) in the LLaVA JSON layout
(``--config.data.json=.../blip_laion_cc_sbu_558k.json --config.data.image_folder=...``).
Steps = one epoch of the published data at the global batch. Stage 1 starts as TinyLLaVA's
scripts do, from the base LLM and the base vision tower with a new connector
(``--config.llm`` / ``--config.vision_tower``: folders or hub ids in the local cache);
``--config.checkpoint`` instead continues from a released TinyLLaVA Factory folder (or its
llava-hf export), whose connector and instruction-tuned LLM it keeps. SigLIP has no published
sink threshold: the sink rule is the adaptive norm-drop rule (tau unknown for SigLIP,
PAPER_NOTES s.3).

    python train.py --config configs/tinyllava_0p5b_diysink.py --workdir runs/t05_pt \\
        --config.llm=Qwen/Qwen2-0.5B --config.vision_tower=google/siglip-so400m-patch14-384 \\
        --config.data.json=LLaVA-558K.json
    python train.py --config configs/tinyllava_0p5b_diysink.py:finetune --workdir runs/t05_ft \\
        --config.checkpoint=runs/t05_pt/export --config.data.json=LLaVA-665K.json

``micro_batch_per_chip``: rows per chip of one gradient-accumulation step in the memory plan
(``python benchmarks/memory.py --plan``); ``optim.grad_accum`` follows from it and the device
count.
"""

from configs.diysink import get_config as diysink_config

DATA = {"pretrain": 558_128, "finetune": 665_298}  # LLaVA-558K / LLaVA-665K items
BATCH = {"pretrain": 256, "finetune": 128}
# per_device_train_batch_size of the authors' scripts: the rows whose token mean their Trainer
# averages (TinyLLaVA Factory's scripts/train/{pretrain,finetune}.sh)
DEVICE_ROWS = {"pretrain": 32, "finetune": 8}
RECIPES = {"tinyllava-0.5b": {"micro_batch_per_chip": 4},
           "tinyllava-3.1b": {"micro_batch_per_chip": 2}}


def recipe(stage: str = ""):
    """The diysink config with TinyLLaVA's recipe for ``stage`` (pretrain, the default | finetune)."""
    stage = stage or "pretrain"
    c = diysink_config()
    c.stage = stage
    c.batch_size = BATCH[stage]
    c.steps = -(-DATA[stage] // BATCH[stage])
    c.finetune_parts = ("multi_modal_projector", "multi_modal_projector_sink", "language_model")
    c.compute_dtype = "bfloat16"
    c.remat = True
    c.scan_layers = True
    c.checkpoint_every = 500
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    c.diysink.rule = dict(rule="adaptive", tau=100.0, k=4, max_fraction=0.1, min_ratio=2.0)
    c.data.image_size = 384
    c.data.system = "tinyllava"  # TinyLLaVA Factory's phi / qwen2_base / llama templates
    c.data.template = "auto"     # stage 1 in the pretrain template (<image> caption \n), as theirs
    c.data.max_length = 2048     # model_max_length: each row cut there after the image is expanded
    c.data.too_long = "truncate"
    c.optim.loss_average = "per_device_batch"  # the token mean per device micro-batch, averaged,
    c.optim.loss_group_rows = DEVICE_ROWS[stage]  # as transformers' Trainer under their scripts
    return c
