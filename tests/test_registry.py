"""The family registry (vitsink_jax.models.registry): every HF model_type maps to its config
reading and module, and config_from_hf dispatches through it."""

import pytest

import conftest
import vitsink_jax as vj
from vitsink_jax.models import registry

# model_type -> the conftest builder of a tiny transformers config of it
FAMILIES = {"clip_vision_model": "clip_vision_config", "siglip_vision_model": "siglip_vision_config",
            "dinov2": "dinov2_config", "internvl_vision": "internvl_vision_config",
            "llama": "llama_config", "qwen2": "qwen2_config", "phi": "phi_config", "phi3": "phi3_config",
            "gemma3_text": "gemma3_text_config", "llava": "llava_config", "gemma3": "gemma3_config",
            "internvl": "internvl_config", "qwen2_5_vl": "qwen2_5_vl_config"}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_reads_writes_and_builds_through_the_registry(model_type):
    d = getattr(conftest, FAMILIES[model_type])().to_dict()
    config = vj.config_from_hf(d)
    assert config.model_type == model_type and vj.config_from_hf(config.to_hf()) == config
    family = registry.family(model_type)
    model = vj.build_model(config)
    if family.kind == "text":
        assert type(model) is vj.CausalLM
    else:
        assert type(model) is family.module and (family.kind != "lvlm" or type(config) is family.config)


def test_every_registered_type_is_known_and_unknown_ones_are_named():
    assert set(registry.model_types("lvlm")) == {"llava", "gemma3", "internvl", "qwen2_5_vl"}
    assert set(registry.model_types("vision", tower=True)) == {
        "clip_vision_model", "siglip_vision_model", "dinov2", "dinov2_with_registers", "internvl_vision",
        "qwen2_5_vl_vision"}
    assert set(registry.model_types("text")) == {"llama", "qwen2", "phi", "phi3", "gemma3_text", "qwen2_5_vl_text"}
    with pytest.raises(ValueError, match="unknown model_type 'mamba'.*LVLM gemma3, internvl, llava, qwen2_5_vl"):
        vj.config_from_hf({"model_type": "mamba"})
    with pytest.raises(ValueError, match="unknown vision model_type 'clip'"):
        vj.VisionConfig("clip", 8, 8, 1, 1, 8, 4)  # an alias, read as its vision half, is no tower type
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_llm(("llama",))
