"""Probes of what a compiled step does: compilations, host reads, HLO ops."""

import contextlib
import re
from unittest import mock

import jax
import jax.numpy as jnp

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations():
  """Counts XLA backend compilations inside the block."""
  count = [0]

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == COMPILE_EVENT:
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield count
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@contextlib.contextmanager
def count_host_reads():
  """Counts reads of device arrays on the host (int(), float(), np.asarray).

  On CPU such reads copy nothing, so jax.transfer_guard_device_to_host does not
  trip on them; every one of them goes through ``_value``, which is counted.
  """
  array_type = type(jnp.zeros(()))
  read = array_type._value.fget
  count = [0]

  def counted_read(array):
    count[0] += 1
    return read(array)

  with mock.patch.object(array_type, "_value", property(counted_read)):
    yield count


def hlo_op_count(lowered, op: str) -> int:
  """How many ``op`` instructions the compiled program of ``lowered`` has."""
  text = lowered.compile().as_text()
  return len(re.findall(rf"= \S+ {op}\(", text))


def input_output_aliases(lowered) -> dict[int, int]:
  """``{output: parameter}`` of the compiled program of ``lowered``: the
  outputs written into the buffer of a (donated) parameter, each numbered in
  the flat order of its tree."""
  header = lowered.compile().as_text().split("\n", 1)[0]
  return {int(output): int(parameter) for output, parameter in re.findall(
      r"\{(\d+)\}: \((\d+), \{\}, (?:may|must)-alias\)", header)}
