"""``--config.help``: every key of a config with its default and the note its file gives it."""

import sys
from pathlib import Path

import pytest

from vitsink_jax.config_help import config_help, key_notes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_notes_come_from_the_assignment_its_continuation_or_the_block_above():
    source = """
    # the sink rule: threshold | topk
    c.sink = ml_collections.ConfigDict(dict(rule="topk", k=4))
    c.eval.batch_size = 8           # rows per forward
                                    # (rounded up to the devices)
    c.seed = 0
    c.tag = "a # not a comment"     # the tag
"""
    notes = key_notes(source)
    assert notes == {"sink": "the sink rule: threshold | topk",
                     "eval.batch_size": "rows per forward (rounded up to the devices)", "seed": "",
                     "tag": "the tag"}


@pytest.mark.parametrize("name", ["default", "diysink"])
def test_every_key_of_the_shipped_configs_is_listed_with_its_default(name):
    import importlib

    cfg = importlib.import_module(f"configs.{name}").get_config()
    path = ROOT / "configs" / f"{name}.py"
    text = config_help(cfg, path.read_text(), str(path))
    flat = {}

    def walk(c, prefix=""):
        for k, v in c.items():
            walk(v, f"{prefix}{k}.") if hasattr(v, "items") else flat.setdefault(prefix + k, v)
    walk(cfg)
    for key, value in flat.items():
        assert f"  --config.{key}={value!r}" in text
    if name == "default":  # the file's order, not sorted
        assert text.index("--config.mode=") < text.index("--config.seed=") < text.index("--config.checkpoint=")
