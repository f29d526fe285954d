"""A checkpoint carries the settings it is evaluated with (vitsink_eval.json), evaluate.py's
modes that score one model default to the shipped trained one, and a run on random weights says
so in its first line."""

import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from vitsink_jax import eval_settings
from vitsink_jax.convert.safetensors_io import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cfg():
    return ml_collections.ConfigDict(dict(
        eval=dict(mc_format="letter", system="", templates=dict(mc="Q: {question}")),
        sink=dict(rule="family", tau=100.0, k=4, max_fraction=0.1, min_ratio=2.0)))


def test_settings_apply_except_where_the_command_line_set_them(tmp_path):
    (tmp_path / eval_settings.FILE).write_text(json.dumps(
        {"eval.mc_format": "cloze", "sink.rule": "topk", "sink.k": 3, "eval.templates": {"mc": "X {question}"}}))
    cfg = _cfg()
    applied = eval_settings.apply(cfg, eval_settings.read(tmp_path), given={"sink.k"})
    assert cfg.eval.mc_format == "cloze" and cfg.sink.rule == "topk" and cfg.sink.k == 4  # given: kept
    assert cfg.eval.templates.mc == "X {question}"
    assert applied == ["eval.mc_format='cloze'", "sink.rule='topk'", "eval.templates={'mc': 'X {question}'}"]
    assert eval_settings.read(tmp_path / "none") == {}


@pytest.mark.parametrize("text, message", [("[1]", "holds a list"), ("{", "not JSON"),
                                           ('{"eval.mc_fromat": "cloze"}', "unknown setting")])
def test_a_bad_settings_file_is_named(tmp_path, text, message):
    (tmp_path / eval_settings.FILE).write_text(text)
    with pytest.raises(CheckpointError, match=f"{eval_settings.FILE}: .*{message}"):
        eval_settings.read(tmp_path)


def test_training_settings_name_the_format_system_and_diysink_rule():
    from configs import diysink

    cfg = diysink.get_config()
    cfg.data.mc_format = "cloze"
    got = eval_settings.from_training(cfg)
    assert got["eval.mc_format"] == "cloze" and got["eval.system"] == ""
    assert got["sink.rule"] == cfg.diysink.rule.rule and got["sink.k"] == cfg.diysink.rule.k
    cfg.diysink.enabled = False  # a stock model: no sink rule of its own
    assert set(eval_settings.from_training(cfg)) == {"eval.mc_format", "eval.system"}


def test_auto_is_the_shipped_model_and_random_weights_say_so(capsys):
    from configs import default
    from vitsink_jax.modes.common import announce_weights, apply_checkpoint_settings, checkpoint_spec

    cfg = default.get_config()
    cfg.mode = "benchmark"
    assert checkpoint_spec(cfg) == "mini_study:single"
    cfg.mode = "interventions"  # its own default (compare.checkpoint)
    assert checkpoint_spec(cfg) == ""
    cfg.mode, cfg.checkpoint = "analyze", "embedded"
    announce_weights(cfg)
    assert capsys.readouterr().out.startswith("random weights: the embedded default model is untrained")
    cfg.checkpoint = "mini_study:single"
    given = {"eval.mc_format"}
    cfg.eval.mc_format = "letter"  # as if given on the command line
    apply_checkpoint_settings(cfg, given)
    assert cfg.eval.mc_format == "letter" and cfg.sink.rule == "topk" and cfg.sink.k == 4


@pytest.mark.slow
def test_benchmark_mode_on_the_shipped_model_gives_the_studys_numbers(tmp_path):
    """``--config.mode=benchmark`` with no checkpoint: the shipped single-MLP model with the
    settings it carries (cloze, top-4 sinks) scores sink-to-the-front exactly as the main job's
    study did (benchmarks/study.json). (~40 s: one evaluate.py process, 96 items.)"""
    proc = subprocess.run([sys.executable, "evaluate.py", f"--workdir={tmp_path}", "--config.mode=benchmark",
                           '--config.variants=("front",)'], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith("checkpoint auto: the shipped trained mini-study model")
    assert "eval.mc_format='cloze'" in proc.stdout and "sink.rule='topk'" in proc.stdout
    study = json.loads((ROOT / "benchmarks" / "study.json").read_text())["results"]["single front"]
    ours = json.loads((tmp_path / "results.json").read_text())["results"]["front"]
    assert (ours["accuracy"], ours["n"]) == (study["accuracy"], study["n"])
