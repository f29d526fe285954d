"""vitsink_jax: ViT attention sinks in LLaVA-style vision-language models, in JAX/Flax.

Public API::

    import vitsink_jax as vj
    model, params = vj.load_pretrained(path, dtype=jnp.float32)
    vj.save_pretrained(model, params, out_dir)
"""

from .config import LlavaConfig, TextConfig, VisionConfig, config_from_hf  # noqa: F401
from .convert.folders import resolve_model_path  # noqa: F401
from .convert.reading import load_pretrained  # noqa: F401
from .convert.safetensors_io import CheckpointError  # noqa: F401
from .convert.writing import checkpoint_hash, save_pretrained  # noqa: F401
from .convert.hf import build_model, init_params  # noqa: F401
from .models import (CausalLM, Gemma3ForConditionalGeneration, InternVLForConditionalGeneration,  # noqa: F401
                     LlavaForConditionalGeneration, MLPProjector, Qwen2_5_VLForConditionalGeneration,
                     VisionTransformer)
from .models.gemma3 import Gemma3Config  # noqa: F401
from .models.internvl import InternVLConfig  # noqa: F401
from .models.qwen2_5_vl import Qwen2_5_VLConfig  # noqa: F401
from .models.llm import REMAT_POLICIES, stack_layers, unstack_layers  # noqa: F401
from .models.lvlm import register_question_encoder  # noqa: F401
from .sinks.detect import SinkRule  # noqa: F401
from .sinks.fuse import VisualTokenPolicy  # noqa: F401

__version__ = "0.1.0"
