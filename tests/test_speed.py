"""Speed where users wait (issue 18): compile time paid once per shape, not once per run."""

import json
import subprocess
import sys

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
