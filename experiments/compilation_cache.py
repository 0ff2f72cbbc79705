"""JAX's persistent compilation cache for the experiment and the benchmarks.

``python -m experiments.finetune`` and ``python -m benchmarks.budget_sweep``
turn it on by default in :data:`DEFAULT_DIRECTORY`
(``~/.cache/multirate_optax/jax``): a second run of the same command loads
its compiled programs from there instead of compiling them again.
``--compilation-cache DIR`` puts it elsewhere, ``--no-compilation-cache``
turns it off (:func:`add_compilation_cache_arguments`). Nothing measured
changes: training clocks start after every program is compiled and run once
(:func:`experiments.finetune.training.warm_up`), so the cache shortens a run,
not its training times. The cache is process-wide JAX configuration, set by
the command lines only, never on import.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import jax

DEFAULT_DIRECTORY = Path.home() / ".cache" / "multirate_optax" / "jax"
# Programs that compile faster than this are not written (XLA:CPU compiles
# the small eager ops in milliseconds; reading them back would cost more).
MIN_COMPILE_SECONDS = 0.5


def enable_compilation_cache(directory: Optional[Path]) -> Optional[Path]:
  """Turns on JAX's persistent compilation cache in ``directory``.

  Creates the directory. Call it before the first compilation of the process:
  JAX reads the setting when it first compiles.

  Args:
    directory: where the compiled programs are kept; ``None`` leaves the
      cache off (``--no-compilation-cache``) and changes nothing.

  Returns:
    ``directory``.

  Example:
    >>> import jax, tempfile
    >>> from pathlib import Path
    >>> before = jax.config.jax_compilation_cache_dir
    >>> enable_compilation_cache(None) is None
    True
    >>> jax.config.jax_compilation_cache_dir == before
    True
  """
  if directory is None:
    return None
  directory = Path(directory).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    MIN_COMPILE_SECONDS)
  return directory


def add_compilation_cache_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds ``--compilation-cache DIR`` and ``--no-compilation-cache``.

  Read them back with :func:`compilation_cache_directory`.

  Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_compilation_cache_arguments(parser)
    >>> compilation_cache_directory(parser.parse_args([])) == DEFAULT_DIRECTORY
    True
    >>> compilation_cache_directory(parser.parse_args(
    ...     ["--compilation-cache", "/tmp/c"])).as_posix()
    '/tmp/c'
    >>> print(compilation_cache_directory(parser.parse_args(
    ...     ["--no-compilation-cache"])))
    None
  """
  parser.add_argument(
      "--compilation-cache", type=Path, default=DEFAULT_DIRECTORY,
      metavar="DIR", help="JAX's persistent compilation cache (default "
      f"{DEFAULT_DIRECTORY}): a second run loads its compiled programs from "
      "there; training times exclude compilation either way")
  parser.add_argument("--no-compilation-cache", action="store_true",
                      help="compile everything, keep nothing")


def compilation_cache_directory(args: argparse.Namespace) -> Optional[Path]:
  """The cache directory the parsed arguments ask for (``None``: off).

  Example:
    >>> import argparse
    >>> compilation_cache_directory(argparse.Namespace(
    ...     compilation_cache=Path("c"), no_compilation_cache=True)) is None
    True
  """
  return None if args.no_compilation_cache else args.compilation_cache
