"""TinyLLaVA-0.5B (SigLIP-so400m + Qwen2-0.5B) DIYSink recipe: configs/tinyllava.py
(``--config configs/tinyllava_0p5b_diysink.py:finetune`` for stage 2)."""

from configs.tinyllava import recipe as get_config  # noqa: F401
