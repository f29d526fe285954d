"""Every setting a run takes, checked at its start, before a model or data is loaded: the command
line against the config file (a config file that does not exist, a misspelt ``--config.<key>``
with the closest key suggested), the environment variables the project reads, and every config
value against one table (:data:`RULES`: ranges and allowed values) plus the few rules that
relate two values (:data:`RELATIONS`). train.py and evaluate.py share it; a failed check is a
:class:`ConfigError`, one ``error:`` line and exit status 2 (:func:`vitsink_jax.cli.main_of`).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from pathlib import Path

from ml_collections import ConfigDict

from .checkpoints import STORAGES
from .data.benchmarks import BENCHMARKS
from .data.instruct import TEMPLATES_OF_TRAINING
from .data.instruct_build import TOO_LONG
from .data.preprocess import ASPECTS
from .data.prompts import MC_FORMATS
from .interventions import parse as parse_intervention
from .models.attention import ATTENTION_IMPLS
from .models.llm import REMAT_POLICIES
from .models.lvlm import QUESTION_ENCODERS
from .parallel import DISTRIBUTED_MODES, LAUNCHERS
from .progress import MODES as PROGRESS_MODES
from .scores import RULE_SETS
from .sinks.analysis import QUERIES
from .sinks.detect import RULES as SINK_RULES
from .sinks.fuse import SELECTS, VisualTokenPolicy
from .train_lib import LOSS_AVERAGES, STAGES


class ConfigError(ValueError):
    """A setting the run cannot start with; the message names the flag (or variable) and what
    it may be."""


def one_of(*allowed):
    """A check: the value is one of ``allowed``."""
    def check(value):
        if value not in allowed:
            return f"is not one of {', '.join(map(str, allowed))}"
    return check


def at_least(low):
    """A check: a number >= ``low``."""
    def check(value):
        if not value >= low:
            return f"must be >= {low}"
    return check


def above(low):
    """A check: a number > ``low``."""
    def check(value):
        if not value > low:
            return f"must be > {low}"
    return check


def in_range(low, high, low_open=False, high_open=False):
    """A check: a number in the interval from ``low`` to ``high`` (ends closed unless open)."""
    def check(value):
        if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
            return f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    return check


def each(check):
    """A check of every item of a tuple."""
    def check_items(values):
        for i, value in enumerate(values):
            why = check(value)
            if why:
                return f"item {i} ({value!r}) {why}"
    return check_items


def parsed_by(parse):
    """A check: ``parse(value)`` takes the value (the library's own parser; its ValueError is
    the reason)."""
    def check(value):
        try:
            parse(value)
        except ValueError as e:
            return f"is refused: {e}"
    return check


def increasing(values):
    """A check: a strictly increasing tuple."""
    if any(b <= a for a, b in zip(values, values[1:])):
        return "must be strictly increasing"


def _variant(spec: str) -> None:
    """A visual-token variant ``order[+select[+positions]]``
    (:func:`vitsink_jax.modes.common.parse_variant`)."""
    parts = spec.split("+")
    if len(parts) > 3:
        raise ValueError("not order[+select[+positions]]")
    VisualTokenPolicy(*parts)


def _question_encoder(name: str) -> None:
    if name not in QUESTION_ENCODERS:  # (the registry as it is when the run starts)
        raise ValueError(f"no question encoder {name!r}; registered: {', '.join(QUESTION_ENCODERS)}")


POSITIVE = above(0)
DTYPES = one_of("float32", "bfloat16")
SINK_RULE = {"rule": one_of(*SINK_RULES), "tau": POSITIVE, "k": at_least(0),
             "max_fraction": in_range(0, 1, low_open=True), "min_ratio": at_least(1)}

# {dotted config key (fnmatch pattern): check} for train.py's and evaluate.py's configs (a key
# a config does not have is not checked); values that are free text or paths are left out
RULES = {
    # train.py (configs/diysink.py and the recipes built on it)
    "stage": one_of(*STAGES), "steps": at_least(0), "batch_size": at_least(1),
    "length_bucket": at_least(1), "compute_dtype": DTYPES, "remat_policy": one_of(*REMAT_POLICIES),
    "attention_impl": one_of(*ATTENTION_IMPLS),
    "parallel": one_of("mesh", "pmap"), "fsdp": at_least(1), "tensor": at_least(1),
    "dcn_data": at_least(1), "checkpoint_every": at_least(1), "keep_checkpoints": at_least(1),
    "checkpoint_storage": one_of(*STORAGES), "log_every": at_least(1),
    "nonfinite": one_of("stop", "skip"), "max_skips": at_least(0),
    "resume_changes": one_of("refuse", "allow"),
    "optim.lr": at_least(0), "optim.lrs.*": at_least(0), "optim.warmup_ratio": in_range(0, 1),
    "optim.warmup_steps": at_least(0), "optim.final_lr_ratio": in_range(0, 1),
    "optim.weight_decay": at_least(0), "optim.b1": in_range(0, 1, high_open=True),
    "optim.b2": in_range(0, 1, high_open=True), "optim.grad_clip": POSITIVE,
    "optim.grad_accum": at_least(1), "optim.loss_average": one_of(*LOSS_AVERAGES),
    "optim.loss_group_rows": at_least(0),
    "diysink.init": one_of("copy", "scratch"), "diysink.select": one_of(*SELECTS),
    "diysink.rew_hidden": at_least(1), "diysink.question_encoder": parsed_by(_question_encoder), **{f"diysink.rule.{k}": v for k, v in SINK_RULE.items()},
    "data.variants": at_least(1), "data.image_size": at_least(1), "data.mc_format": one_of(*MC_FORMATS),
    "data.prefetch": at_least(0), "data.workers": at_least(1),
    "data.template": one_of(*TEMPLATES_OF_TRAINING, "auto"),
    "data.image_aspect_ratio": one_of(*ASPECTS, "auto"), "data.max_length": at_least(0),
    "data.too_long": one_of(*TOO_LONG), "data.build_workers": at_least(0),
    "data.shard_rows": at_least(1),
    # evaluate.py (configs/default.py); "mode" comes from the table of modes (vitsink_jax.modes.MODES)
    "dtype": DTYPES, "top_k": at_least(1), **{f"sink.{k}": v for k, v in SINK_RULE.items()},
    "sink.rule": one_of("family", *SINK_RULES), "llm_tau": POSITIVE, "llm_sink_dims": each(at_least(0)),
    "analysis.queries": one_of(*QUERIES), "analysis.max_new_tokens": at_least(0),
    "benchmark.name": one_of(*BENCHMARKS), "benchmark.limit": at_least(0),
    "benchmark.variants": at_least(1), "benchmark.image_size": at_least(1),
    "bucket_edges": increasing, "variants": each(parsed_by(_variant)),
    "sweep.variant": parsed_by(_variant), "compare.specs": each(parsed_by(parse_intervention)),
    "score.rules": one_of("auto", *RULE_SETS), "sweep.taus": each(POSITIVE),
    "eval.scoring": one_of("loglik", "generate"), "eval.batch_size": at_least(1),
    "eval.length_bucket": at_least(1), "eval.max_new_tokens": at_least(1),
    "eval.parallel": one_of("mesh", "pmap"), "eval.fsdp": at_least(1), "eval.tensor": at_least(1),
    "eval.dcn_data": at_least(1), "eval.mc_format": one_of(*MC_FORMATS),
    "eval.routing": one_of("none", "cot"), "study.rule": one_of(*SINK_RULES),
    "study.mc_format": one_of(*MC_FORMATS), "compare.rule": one_of(*SINK_RULES),
    "compare.mc_format": one_of(*MC_FORMATS), "compare.decode_steps": at_least(0),
    # both
    "distributed.mode": one_of(*DISTRIBUTED_MODES), "distributed.num_processes": at_least(1),
    "distributed.process_id": at_least(0), "distributed.local_device_count": at_least(0),
    "embedded.vision": one_of("random_clip", "dinov2_s"), "embedded.*": at_least(1),
}


def _loss_groups(flat: dict) -> str | None:
    """Per-device-batch loss groups of ``optim.loss_group_rows`` rows tile the batch."""
    if flat.get("optim.loss_average") == "per_device_batch" and flat.get("optim.loss_group_rows") \
            and flat["batch_size"] % flat["optim.loss_group_rows"]:
        return (f"--config.optim.loss_group_rows={flat['optim.loss_group_rows']} does not divide "
                f"--config.batch_size={flat['batch_size']} (loss groups are consecutive rows of the "
                "update's batch)")


def _process_id(flat: dict) -> str | None:
    """A configured process id is one of the configured processes."""
    if flat.get("distributed.process_id", 0) >= flat.get("distributed.num_processes", 1):
        return (f"--config.distributed.process_id={flat['distributed.process_id']} must be below "
                f"--config.distributed.num_processes={flat['distributed.num_processes']}")


RELATIONS = (_loss_groups, _process_id)


def flatten(config) -> dict:
    """{dotted key: value} of every leaf of a ConfigDict (nested blocks by their path)."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items") and not isinstance(value, (str, bytes)):
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[key] = value
    return out


def check_config(config, extra: dict | None = None) -> None:
    """Raises :class:`ConfigError` naming the first value of ``config`` that breaks a rule of
    :data:`RULES` (or of ``extra``, more rules of the same form) or :data:`RELATIONS`."""
    rules = {**RULES, **(extra or {})}
    flat = flatten(config)
    for key, value in flat.items():
        pattern = next((p for p in rules if p == key), None) or next(
            (p for p in rules if fnmatch.fnmatchcase(key, p)), None)
        why = None if pattern is None or value is None else rules[pattern](value)
        if why:
            raise ConfigError(f"--config.{key}={value!r} {why}")
    for relation in RELATIONS:
        why = relation(flat)
        if why:
            raise ConfigError(why)


def check_environment(environ=None) -> None:
    """The environment variables the project reads that can be wrong: ``VITSINK_JAX_PROGRESS``
    (:mod:`vitsink_jax.progress`) and the process count / id of a launcher's job (SLURM, mpirun:
    :data:`vitsink_jax.parallel.LAUNCHERS`), which must be integers. (``VITSINK_CACHE``,
    ``VITSINK_JAX_CACHE``, ``JAX_COMPILATION_CACHE_DIR`` and ``XDG_CACHE_HOME`` are folders, any
    text.)"""
    environ = os.environ if environ is None else environ
    chosen = environ.get("VITSINK_JAX_PROGRESS", "").strip().lower()
    if chosen and chosen not in PROGRESS_MODES:
        raise ConfigError(f"environment variable VITSINK_JAX_PROGRESS={chosen!r} is not one of "
                          f"{', '.join(PROGRESS_MODES)} (or unset: a bar on a terminal, lines elsewhere)")
    for name, needs, count, rank in LAUNCHERS:
        for var in (count, rank) if all(v in environ for v in needs) else ():
            if not re.fullmatch(r"\d+", environ[var].strip()):
                raise ConfigError(f"environment variable {var}={environ[var]!r} is not a process "
                                  f"count / id ({name} job)")


def config_argument(argv, default: str) -> str:
    """The value of ``--config`` in ``argv`` (``--config=X`` or ``--config X``; the last one),
    else ``default``."""
    spec = default
    for i, arg in enumerate(argv):
        match = re.match(r"^--?config(=(.*))?$", arg)
        if match:
            spec = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
    return spec


def load_config_file(spec: str):
    """The config ``get_config()`` of ``spec`` ("file.py" or "file.py:argument") returns, as
    ml_collections' ``--config`` flag loads it; a missing file or a failing ``get_config`` is
    a :class:`ConfigError` naming the file."""
    from ml_collections.config_flags import config_flags

    file = spec.split(":", 1)[0]
    if not file or not Path(file).is_file():
        where = "" if Path(file).is_absolute() else f" (relative to {os.getcwd()})"
        raise ConfigError(f"--config={spec}: config file {file or '(empty)'} does not exist{where}")
    try:
        config = config_flags.ConfigFileFlagParser("config", lock_config=False).parse(spec)
    except Exception as e:  # the config file's own code, with the user's argument
        raise ConfigError(f"--config={spec}: get_config failed: "
                          f"{type(e).__name__}: {str(e).strip().splitlines()[-1]}") from e
    if not isinstance(config, ConfigDict):  # ml_collections' stand-in for one that did not load
        try:
            config.keys()
        except OSError as e:
            raise ConfigError(f"--config={spec}: {' '.join(str(e).split())}") from e
    return config


def config_keys(config) -> set:
    """Every dotted key ``--config.<key>`` can set: the leaves and the blocks holding them."""
    keys = set()
    for key in flatten(config):
        parts = key.split(".")
        keys.update(".".join(parts[:n]) for n in range(1, len(parts) + 1))
    return keys


def check_command_line(argv, default_config: str) -> None:
    """Before the flags are parsed: the config file ``--config`` names (or ``default_config``)
    exists and loads, and every ``--config.<key>`` override in ``argv`` names one of its keys
    (else :class:`ConfigError` with the closest key, by difflib)."""
    spec = config_argument(argv, default_config)
    config = load_config_file(spec)
    keys = config_keys(config)
    for arg in argv:
        match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
        if match and match.group(1) not in keys:
            key = match.group(1)
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f"did you mean --config.{close[0]}?" if close else f"the keys are in {spec.split(':')[0]}"
            raise ConfigError(f"--config.{key}: no such key; {hint}")
