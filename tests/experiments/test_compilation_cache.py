"""The persistent compilation cache of the experiment's and the benchmarks'
command lines: a second process loads what the first compiled, and the
opt-out flag leaves JAX's configuration alone."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Compiles one program (the threshold lowered so that it is written) and
# reports JAX's cache events and what the command line's flags resolved to.
SCRIPT = """
import collections, json, sys
import jax, jax.numpy as jnp
from experiments.finetune.__main__ import parse_args
from experiments.compilation_cache import enable_compilation_cache
events = collections.Counter()
jax.monitoring.register_event_listener(lambda e, **kw: events.update([e]))
*_, cache = parse_args(sys.argv[1:])
enable_compilation_cache(cache)
if cache is not None:
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
configured = jax.config.jax_compilation_cache_dir
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((4, 4))).block_until_ready()
print(json.dumps({"dir": configured, "cache": None if cache is None else str(cache),
                  "hits": events["/jax/compilation_cache/cache_hits"]}))
"""


def run(*flags):
  done = subprocess.run([sys.executable, "-c", SCRIPT, *flags], cwd=ROOT,
                        capture_output=True, text=True, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_first_ones_programs(tmp_path):
  directory = tmp_path / "cache"
  first = run("--compilation-cache", str(directory))
  assert first == {"dir": str(directory), "cache": str(directory), "hits": 0}
  assert any(directory.iterdir())  # The program was written there.
  second = run("--compilation-cache", str(directory))
  assert second["hits"] >= 1  # The jitted program and the eager ops.


def test_no_compilation_cache_leaves_jax_configuration_alone(tmp_path):
  off = run("--no-compilation-cache", "--compilation-cache",
            str(tmp_path / "unused"))
  assert off == {"dir": None, "cache": None, "hits": 0}
  assert not (tmp_path / "unused").exists()
