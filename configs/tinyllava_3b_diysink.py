"""TinyLLaVA-3.1B (SigLIP-so400m + Phi-2) DIYSink recipe: configs/tinyllava.py
(``--config configs/tinyllava_3b_diysink.py:finetune`` for stage 2)."""

from configs.tinyllava import recipe as get_config  # noqa: F401
