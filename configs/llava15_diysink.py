"""The paper's LLaVA-1.5 DIYSink recipe (7B: Vicuna-7B v1.5 + CLIP ViT-L/14-336), as LLaVA's own
scripts/v1_5 run it: stage 1 the connector only (lr 1e-3, global batch 256, LLaVA-558K in the
plain template), stage 2 connector + LLM (lr 2e-5, global batch 128, LLaVA-665K after the
vicuna_v1 system prompt, images padded to a square with the mean colour), one epoch each,
warmup 3%, cosine, weight decay 0, rows cut at 2048 tokens, bf16; the sink rule is the paper's
tau = 100 on CLIP's ViT (PAPER_NOTES s.3). ``:finetune`` for stage 2; 13B: Vicuna-13B v1.5 as
``--config.llm``.

    python train.py --config configs/llava15_diysink.py --workdir runs/l7_pt \\
        --config.llm=lmsys/vicuna-7b-v1.5 --config.vision_tower=openai/clip-vit-large-patch14-336 \\
        --config.data.json=LLaVA-558K.json --config.data.image_folder=IMAGES
    python train.py --config configs/llava15_diysink.py:finetune --workdir runs/l7_ft \\
        --config.checkpoint=runs/l7_pt/export --config.data.json=LLaVA-665K.json \\
        --config.data.image_folder=IMAGES
"""

from configs.tinyllava import recipe


def get_config(stage: str = ""):
    """TinyLLaVA's shared recipe (same data, batches, schedule) with LLaVA-1.5's tower, prompt,
    image padding and sink rule."""
    c = recipe(stage)
    c.data.image_size = 336
    c.data.system = "vicuna_v1"
    c.data.image_aspect_ratio = "pad" if c.stage == "finetune" else "crop"
    c.diysink.rule = dict(rule="threshold", tau=100.0, k=4, max_fraction=0.1, min_ratio=2.0)
    c.optim.loss_group_rows = {"pretrain": 32, "finetune": 16}[c.stage]  # scripts/v1_5's per-device batch
    return c
