"""Default evaluate.py config: the demo main job on the embedded default model.

Until real weights ship (see the README's roadmap), the embedded default is a small LLaVA
(CLIP-style tower + LLaMA-style LM) with seeded random weights, written in Hugging Face layout and
loaded back through the converter, so the whole pipeline runs offline.
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.mode = "demo"
    c.seed = 0
    c.checkpoint = ""      # a Hugging Face LLaVA folder; "" = build the embedded default in workdir
    c.images = ""          # a folder of images; "" = real photos bundled with scikit-image
    c.dtype = "float32"    # compute dtype: float32 | bfloat16
    c.top_k = 5            # highest-norm visual tokens to report per image

    c.embedded = ml_collections.ConfigDict()  # shape of the embedded default model
    c.embedded.image_size = 112
    c.embedded.patch_size = 14
    c.embedded.vision_hidden = 192
    c.embedded.vision_layers = 4
    c.embedded.vision_heads = 3
    c.embedded.text_hidden = 256
    c.embedded.text_layers = 4
    c.embedded.text_heads = 4
    c.embedded.text_kv_heads = 2
    c.embedded.vocab_size = 1024
    return c
