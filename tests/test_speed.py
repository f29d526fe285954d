"""Speed where users wait (issue 18): compile time paid once per shape, not once per run."""

import json
import subprocess
import sys

import pytest

PROGRAM = """
import json, sys
import jax, jax.numpy as jnp
from vitsink_jax import compile_cache
compile_cache.enable(sys.argv[1])
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
f(jnp.ones((64, 64))).block_until_ready()
print(json.dumps(compile_cache.stats()))
"""


def test_a_second_process_loads_its_programs_from_the_persistent_cache(tmp_path):
    """The first process compiles and writes the cache folder; a second one with the same
    shapes loads every program from it (hits, no miss) and reports its compile seconds."""
    def run():
        out = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path / "xla")], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["cache"] == str(tmp_path / "xla") and first["cache_misses"] >= 1
    assert any((tmp_path / "xla").iterdir())
    assert second["cache_hits"] >= 1 and second["cache_misses"] == 0
    assert second["compile_seconds"] >= 0 and second["trace_seconds"] > 0


# ------------------------------------- what checkpoints resolve to, without torch next time ---

def _family_configs() -> dict:
    """config.json dicts of every family (tiny), as save_pretrained writes them."""
    import conftest as C
    from vitsink_jax.config import DIYSinkConfig
    from vitsink_jax.sinks.detect import SinkRule

    diy = {**C.llava_config(text=C.qwen2_config()).to_dict(),
           "diysink": DIYSinkConfig(SinkRule("topk", k=2)).to_dict()}
    return {"llava": C.llava_config().to_dict(), "llava+diysink": diy,
            "llava-siglip-phi3": C.llava_config(C.siglip_vision_config(), C.phi3_config()).to_dict(),
            "gemma3": C.gemma3_config().to_dict(), "internvl": C.internvl_config().to_dict(),
            "qwen2_5_vl": C.qwen2_5_vl_config().to_dict(), "dinov2": C.dinov2_config(registers=2).to_dict(),
            "phi": C.phi_config().to_dict(), "llama-rope-scaling": C.llama_config(
                rope_scaling={"rope_type": "linear", "factor": 2.0}).to_dict()}


def test_remembered_configs_equal_the_parsed_ones_and_bad_entries_are_parsed_again(tmp_path):
    """With a folder set, a config.json is parsed through transformers once: the entry read back
    is the same config (every field, the kept HF dict) for every family; an unreadable or
    foreign entry is parsed again; a config that does not parse raises and stores nothing; a
    folder that cannot be written costs a warning, not the load."""
    from unittest import mock

    import pytest
    from vitsink_jax import resolved
    from vitsink_jax.config import config_from_hf

    calls = []

    def parse(d):
        calls.append(1)
        return config_from_hf(d)

    resolved.enable(tmp_path / "r")
    try:
        for name, raw in _family_configs().items():
            first, n = resolved.config(raw, parse), len(calls)
            again = resolved.config(raw, parse)
            assert len(calls) == n, name  # read back, not parsed
            assert type(again) is type(first) and again == first, name
            assert again.to_hf() == first.to_hf() and again.hf_json == first.hf_json, name
        raw = _family_configs()["llava"]
        entries = sorted((tmp_path / "r").glob("config-*.json"))
        assert len(entries) == len(_family_configs())
        for bad in ("{not json", '{"__class__": "os:system"}', '{"__class__": "vitsink_jax.config:Nope"}'):
            for e in entries:
                e.write_text(bad)
            n = len(calls)
            assert resolved.config(raw, parse) == config_from_hf(raw) and len(calls) == n + 1
        with pytest.raises(ValueError, match="unknown model_type"):
            resolved.config({"model_type": "bert"}, parse)
        assert len(list((tmp_path / "r").glob("config-*.json"))) == len(entries)
        for e in entries:
            e.unlink()
        with mock.patch.object(resolved, "write_text_atomic", side_effect=OSError(28, "No space left")):
            with pytest.warns(UserWarning, match="not remembering the config"):
                assert resolved.config(raw, parse) == config_from_hf(raw)  # a full disk costs a warning
    finally:
        resolved.enable(None)


def test_remembered_tokenizer_classes_load_what_autotokenizer_loads(tmp_path):
    """A tokenizer folder of each family style loads through its remembered class as
    AutoTokenizer loads it: the same class, special tokens and ids."""
    import transformers
    from conftest import hf_tokenizer
    from vitsink_jax import resolved

    text = "USER: <image>\nWhat is on the mat? A. a cat B. 12 dogs\nASSISTANT: A"
    resolved.enable(tmp_path / "r")
    try:
        for family in ("llama", "qwen2", "gemma", "internvl", "qwen2_5_vl"):
            folder = tmp_path / family
            hf_tokenizer(family, folder, [text, "a cat on the mat", "12 dogs"])
            ref = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            first, second = resolved.tokenizer(folder), resolved.tokenizer(folder)
            for tok in (first, second):
                assert type(tok) is type(ref), family
                assert tok.encode(text) == ref.encode(text), family
                assert tok.all_special_tokens == ref.all_special_tokens, family
                assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
                    (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id), family
        assert len(list((tmp_path / "r").glob("tokenizer-*.json"))) == 5
    finally:
        resolved.enable(None)


LOADER = """
import sys
from vitsink_jax import compile_cache
compile_cache.enable(sys.argv[1])
import vitsink_jax as vj
from vitsink_jax.data.tokenizer import load_tokenizer
model, params = vj.load_pretrained(sys.argv[2])
tok = load_tokenizer(sys.argv[2])
print(type(model).__name__, type(tok).__name__, "torch" in sys.modules)
"""


@pytest.mark.slow
def test_a_repeat_run_loads_a_checkpoint_and_its_tokenizer_without_torch(tmp_path):
    """The CLIs' cache switch on: the first process reads config.json and the tokenizer through
    transformers (torch imported), the second one loads both from what the first remembered
    and never imports torch."""
    import transformers
    from conftest import build, llava_config, save
    from vitsink_jax.embedded import embedded_tokenizer

    folder = save(build(transformers.LlavaForConditionalGeneration, llava_config()), tmp_path / "llava")
    embedded_tokenizer(512).save_pretrained(str(folder))

    def run():
        return subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "xla"), str(folder)],
                              check=True, capture_output=True, text=True).stdout.split()[-3:]

    assert run() == ["LlavaForConditionalGeneration", "TokenizersBackend", "True"]
    assert run() == ["LlavaForConditionalGeneration", "TokenizersBackend", "False"]
