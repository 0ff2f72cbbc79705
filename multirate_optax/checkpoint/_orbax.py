"""Saving and restoring multirate training and budgeted transfers with orbax."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional, Union

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src import asyncio_utils

from multirate_optax.core._groups import path_str
from multirate_optax.budgeted._reparametrized import (
    check_layers_in, leaves_by_path, merge, unknown_layer_error)
from multirate_optax.core._timetable import TimetableState, find_timetable_state

PyTree = Any
Directory = Union[str, os.PathLike, ocp.CheckpointManager]

STATE_ITEM = "state"
MULTIRATE_ITEM = "multirate"
_FORMAT = 2


def save(
    directory: Directory,
    step: int,
    state: PyTree,
    *,
    timetable_from: Optional[PyTree] = None,
    force: bool = False,
) -> bool:
  """Saves a training state and the identity of its timetable.

  Args:
    directory: a directory (a :class:`orbax.checkpoint.CheckpointManager` is
      opened on it and closed once the checkpoint is written), or a
      ``CheckpointManager`` of yours, whose options (retention, save interval,
      asynchronous writing) then apply; call its ``wait_until_finished`` before
      relying on the files.
    step: the step number the checkpoint is filed under; any step, mid-cycle
      included.
    state: the whole training state, any pytree of arrays and scalars holding
      exactly one :func:`multirate_optax.multirate` state (a ``dict``, a Flax
      ``TrainState``, ...).
    timetable_from: where to find the multirate state when ``state`` does not
      keep it as a pytree node, as ``nnx.state(optimizer)`` does not: pass
      the ``nnx.Optimizer``. Default: ``state``.
    force: save even if the manager's options would skip this step.

  Returns:
    Whether a checkpoint was written (``False`` only when a manager's options
    skip ``step``).

  Example:
    Saved in the middle of a cycle (step 3 of ``period=4``), restored into a
    freshly built state, the run resumes where it stopped:

    >>> import tempfile
    >>> import jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> from multirate_optax import checkpoint
    >>> params = {'body': jnp.ones(3), 'head': jnp.ones(2)}
    >>> tx = mo.multirate(optax.sgd(0.1), labels={'body': 'slow', 'head': 'fast'},
    ...                   period=4)
    >>> step = mo.train_step(lambda p: jnp.sum(p['body']) + jnp.sum(p['head']), tx)
    >>> opt_state = tx.init(params)
    >>> for _ in range(3):
    ...   params, opt_state, loss = step(params, opt_state)
    >>> fresh = {'params': jax.tree.map(jnp.zeros_like, params),
    ...          'opt_state': tx.init(params)}
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   written = checkpoint.save(directory, 3, {'params': params,
    ...                                            'opt_state': opt_state})
    ...   restored = checkpoint.restore(directory, fresh)
    >>> written, int(restored['opt_state'].count)
    (True, 3)
    >>> bool(jnp.array_equal(restored['params']['head'], params['head']))
    True
  """
  metadata = _timetable_metadata(state, timetable_from)
  args = ocp.args.Composite(**{
      STATE_ITEM: ocp.args.StandardSave(state),
      MULTIRATE_ITEM: ocp.args.JsonSave(metadata),
  })
  if isinstance(directory, ocp.CheckpointManager):
    return directory.save(step, args=args, force=force)
  with _open(directory) as manager:
    return manager.save(step, args=args, force=force)


def restore(
    directory: Directory,
    target: PyTree,
    *,
    step: Optional[int] = None,
    timetable_from: Optional[PyTree] = None,
) -> PyTree:
  """Restores a training state saved by :func:`save`, after checking its timetable.

  Args:
    directory: the directory or ``CheckpointManager`` given to :func:`save`.
    target: a training state with the structure of the saved one, built the
      same way (same optimizer, period and labels): concrete arrays, or
      ``jax.ShapeDtypeStruct`` leaves. The restored arrays get the target leaves'
      dtypes and shardings, so a target sharded over a mesh restores sharded.
    step: the step to restore; default the latest.
    timetable_from: as in :func:`save`, for a target that does not keep the
      multirate state as a pytree node.

  Returns:
    The restored state, with the structure of ``target``.

  Raises:
    FileNotFoundError: if there is no checkpoint to restore.
    ValueError: if the checkpoint was written for another timetable (e.g.
      another period) or with other labels than ``target``'s, or without the
      multirate metadata.

  Example:
    A target built with the run's optimizer restores; one built with another
    period is refused:

    >>> import tempfile
    >>> import jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> from multirate_optax import checkpoint
    >>> params = {'body': jnp.ones(3), 'head': jnp.ones(2)}
    >>> labels = {'body': 'slow', 'head': 'fast'}
    >>> def state(period):
    ...   tx = mo.multirate(optax.sgd(0.1), labels=labels, period=period)
    ...   return {'params': params, 'opt_state': tx.init(params)}
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   _ = checkpoint.save(directory, 0, state(4))
    ...   restored = checkpoint.restore(directory, state(4), step=0)
    ...   try:
    ...     checkpoint.restore(directory, state(2))
    ...   except ValueError as e:
    ...     refusal = str(e)
    >>> restored['opt_state'].timetable
    MultirateTimetable(period=4)
    >>> print(refusal[refusal.index('expected'):refusal.index(' in the checkpoint')])
    expected MultirateTimetable(period=2) (the target state's), found MultirateTimetable(period=4)
  """
  expected = _timetable_metadata(target, timetable_from)
  if isinstance(directory, ocp.CheckpointManager):
    return _restore(directory, target, step, expected)
  with _open(directory) as manager:
    return _restore(manager, target, step, expected)


def _open(directory: Union[str, os.PathLike]) -> ocp.CheckpointManager:
  directory = os.fspath(directory)
  if "://" not in directory:  # Orbax wants local paths absolute.
    directory = os.path.abspath(directory)
  return ocp.CheckpointManager(directory)


def _restore(manager: ocp.CheckpointManager, target: PyTree,
             step: Optional[int], expected: dict[str, Any]) -> PyTree:
  if step is None:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}.")
  where = f"the checkpoint of step {step} in {manager.directory}"
  try:
    with _reads_finish_before_their_loop_closes():
      found = manager.restore(step, args=ocp.args.Composite(**{
          MULTIRATE_ITEM: ocp.args.JsonRestore()}))[MULTIRATE_ITEM]
  except KeyError as e:  # Orbax's error for an item the checkpoint lacks.
    if MULTIRATE_ITEM not in str(e):
      raise
    raise ValueError(
        f"{where} has no {MULTIRATE_ITEM!r} item: it was not written by "
        "multirate_optax.checkpoint.save, so its timetable cannot be "
        "checked.") from e
  except (ValueError, UnicodeDecodeError) as e:  # json's errors included.
    raise ValueError(
        f"{where} has unreadable metadata in "
        f"{_metadata_file(manager, step)} ({type(e).__name__}: {e}): the file "
        "is damaged; restore another step.") from e
  _check_same_timetable(expected, found, where, _metadata_file(manager, step))
  try:
    with _reads_finish_before_their_loop_closes():
      return manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(target)}))[STATE_ITEM]
  except (ValueError, UnicodeDecodeError) as e:  # json's errors included.
    damaged = _damaged_json_files(manager.directory / str(step))
    if damaged:
      raise ValueError(
          f"{where} has damaged orbax metadata in {', '.join(damaged)} "
          f"({type(e).__name__}: {str(e)[:200]}): the file is truncated or "
          "corrupted; restore another step "
          f"({_other_steps(manager, step)}).") from e
    # Tensorstore's errors: 'DATA_LOSS: ... Error reading "<array>/.zarray"
    # ... local file "<the file it could not decode or read>"...'.
    unreadable = re.match(r"([A-Z_]+): .*?Error reading \"([^\"/]+)", str(e))
    if unreadable:
      code, array = unreadable.groups()
      files = re.findall(r'local file \"([^\"]*[^/\"])\"', str(e))
      file = files[0] if files else os.fspath(
          manager.directory / str(step) / STATE_ITEM)
      raise ValueError(
          f"{where} holds array data that cannot be read: {code} in {file} "
          f"(reading {array!r}): the file is truncated or corrupted; restore "
          f"another step ({_other_steps(manager, step)}).") from e
    raise


def _other_steps(manager: ocp.CheckpointManager, step: int) -> str:
  others = [s for s in manager.all_steps() if s != step]
  return (f"the directory holds steps {others}, restore(..., step=N)"
          if others else "the directory holds no other step")


# Orbax's metadata files that hold JSON, in a step's directory and its items'.
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")


def _damaged_json_files(step_directory: epath.Path) -> list[str]:
  """The orbax JSON metadata files in a step's directory that do not parse."""
  candidates = [step_directory / "_CHECKPOINT_METADATA"]
  if step_directory.is_dir():
    for item in sorted(step_directory.iterdir()):
      if item.is_dir():
        candidates += [item / name for name in _JSON_FILES[1:]]
        if (item / "array_metadatas").is_dir():
          candidates += sorted((item / "array_metadatas").iterdir())
  damaged = []
  for file in candidates:
    if not file.is_file():
      continue
    try:
      json.loads(file.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
      damaged.append(os.fspath(file))
  return damaged


# Orbax's function that runs a restore's coroutine on a new event loop, and
# how many restores run with it replaced (see below).
_ORBAX_RUN = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
_LOOP_PATCH = threading.Lock()
_LOOP_PATCH_DEPTH = [0]


def _run_until_every_task_is_done(coro: Any) -> Any:
  """Orbax's ``asyncio_utils._run_sync_via_new_loop``, but the loop is closed
  only once every task the coroutine started is done.

  When one read of a restore fails, orbax's gather returns the error at once
  and its loop is closed while the other reads are still in flight;
  tensorstore then delivers their results to the closed loop from its own
  threads, and each delivery prints a "RuntimeError: Event loop is closed"
  traceback. The other reads of a damaged checkpoint fail too: their errors,
  which no one awaits once the first is raised, are not logged either.
  """
  loop = asyncio.new_event_loop()
  loop.set_exception_handler(_unretrieved_errors_dropped)
  try:
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)
  finally:
    try:
      while pending := asyncio.all_tasks(loop):
        loop.run_until_complete(
            asyncio.gather(*pending, return_exceptions=True))
    finally:
      asyncio.set_event_loop(None)
      loop.close()


def _unretrieved_errors_dropped(loop: asyncio.AbstractEventLoop,
                                context: dict[str, Any]) -> None:
  if context.get("message") != "Task exception was never retrieved":
    loop.default_exception_handler(context)


@contextlib.contextmanager
def _reads_finish_before_their_loop_closes() -> Iterator[None]:
  """Inside, orbax's reads run on loops that outlive them (see
  :func:`_run_until_every_task_is_done`); a no-op if orbax has changed."""
  if _ORBAX_RUN is None:
    yield
    return
  with _LOOP_PATCH:
    _LOOP_PATCH_DEPTH[0] += 1
    asyncio_utils._run_sync_via_new_loop = _run_until_every_task_is_done
  try:
    yield
  finally:
    with _LOOP_PATCH:
      _LOOP_PATCH_DEPTH[0] -= 1
      if _LOOP_PATCH_DEPTH[0] == 0:
        asyncio_utils._run_sync_via_new_loop = _ORBAX_RUN


def _metadata_file(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(step), MULTIRATE_ITEM,
                      "metadata")


def _timetable_metadata(state: PyTree,
                       timetable_from: Optional[PyTree]) -> dict[str, Any]:
  """The JSON description of the timetable in ``state``."""
  try:
    timetable_state = find_timetable_state(
        state if timetable_from is None else timetable_from)
  except ValueError as e:
    raise ValueError(
        f"{e} For a state that keeps no pytree node for it (such as "
        "nnx.state(optimizer)), pass timetable_from=<the nnx.Optimizer>.") from None
  return {
      "format": _FORMAT,
      "timetable": _timetable_description(timetable_state),
      "labels": list(timetable_state.labels),
      "paths": _parameter_paths(state, len(timetable_state.labels)),
  }


def _timetable_description(timetable_state: TimetableState) -> dict[str, Any]:
  timetable = timetable_state.timetable
  if dataclasses.is_dataclass(timetable):
    fields = {f.name: getattr(timetable, f.name)
              for f in dataclasses.fields(timetable)}
  else:
    fields = {"repr": repr(timetable)}
  fields = {name: value if isinstance(value, (bool, int, float, str))
            else repr(value) for name, value in fields.items()}
  return {"type": type(timetable).__qualname__, "fields": fields}


def _parameter_paths(state: PyTree, num_leaves: int) -> Optional[list[str]]:
  """The leaf paths of ``state``'s parameters, to name them in errors.

  The parameters are the first subtree under a key or attribute ``params``
  (a dict entry, a ``TrainState`` field) with one leaf per label; ``None`` if
  there is none, and leaves are then named by their index.
  """
  groups: dict[tuple[Any, ...], list[str]] = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
    for i, key in enumerate(path):
      name = getattr(key, "key", getattr(key, "name", None))
      if name == "params":
        groups.setdefault(path[:i + 1], []).append(path_str(path[i + 1:]))
        break
  for paths in groups.values():
    if len(paths) == num_leaves:
      return paths
  return None


def _describe(timetable: dict[str, Any]) -> str:
  fields = ", ".join(f"{name}={value!r}"
                     for name, value in timetable["fields"].items())
  return f"{timetable['type']}({fields})"


def _check_same_timetable(expected: dict[str, Any], found: Any, where: str,
                          file: str) -> None:
  """Raises a ValueError naming what differs between two timetable descriptions."""
  if not isinstance(found, dict) or not {"format", "timetable", "labels",
                                         "paths"} <= set(found):
    raise ValueError(
        f"{where} has damaged metadata in {file}: expected a JSON object with "
        f"format, timetable, labels and paths, found {str(found)[:200]!r}.")
  if found["format"] != _FORMAT:
    raise ValueError(
        f"{where} holds multirate metadata of format {found['format']!r}; "
        f"this version reads format {_FORMAT}.")
  if found["timetable"] != expected["timetable"]:
    raise ValueError(
        f"{where} was written with another timetable: expected "
        f"{_describe(expected['timetable'])} (the target state's), found "
        f"{_describe(found['timetable'])} in the checkpoint. Restore it into a "
        "state whose optimizer is built with the same multirate period as the "
        "run that wrote it.")
  want, got = expected["labels"], found["labels"]
  if want == got:
    return
  if len(want) != len(got):
    raise ValueError(
        f"{where} was written with labels for {len(got)} parameter leaves; "
        f"the target state has {len(want)}.")
  paths = expected["paths"] or found["paths"]
  names = [repr(p) for p in paths] if paths else [
      f"leaf {i}" for i in range(len(want))]
  differ = [i for i, (w, g) in enumerate(zip(want, got)) if w != g]
  details = "; ".join(
      f"{names[i]}: expected {want[i]!r}, found {got[i]!r}" for i in differ[:5])
  raise ValueError(
      f"{where} was written with other labels: {len(differ)} of {len(want)} "
      f"parameter leaves are in another group ({details}"
      f"{'; ...' if len(differ) > 5 else ''}). 'expected' is the target "
      "state's label, 'found' the checkpoint's; build the optimizer with the "
      "labels of the run that wrote it.")


TRANSFER_ITEM = "transfer"
ARRAYS_ITEM = "arrays"
_TRANSFER_FORMAT = 1


def save_transfer(
    path: Union[str, os.PathLike],
    deltas: Mapping[str, Any],
    selection: Iterable[str],
    *,
    replaced: Optional[Mapping[str, Any]] = None,
    force: bool = False,
) -> None:
  """Saves a task's artefact: the changes ``dW_l`` of the selected layers only.

  Two orbax items: ``'arrays'`` (the selected changes, and the ``replaced``
  leaves) and ``'transfer'`` (JSON: the selection, and each array's layer,
  shape and dtype), so that :func:`load_transfer` can check a backbone
  before merging.

  Args:
    path: the directory to write (it must not exist, unless ``force``).
    deltas: ``{layer: dW_l}``; only the selected entries are stored.
    selection: the adapted layers, e.g. from
      :func:`multirate_optax.budgeted.select_within_budget`.
    replaced: ``{path: array}``, leaves stored whole that replace the
      backbone's on loading (a task's own classifier head, say).
    force: overwrite an existing ``path``.

  Example:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> from multirate_optax import budgeted, checkpoint
    >>> base = {'a': {'kernel': jnp.zeros((2, 2))}, 'b': {'kernel': jnp.zeros((2, 2))}}
    >>> deltas = {'a/kernel': jnp.ones((2, 2)), 'b/kernel': jnp.ones((2, 2))}
    >>> path = os.path.join(tempfile.mkdtemp(), 'task')
    >>> checkpoint.save_transfer(path, deltas, ['b/kernel'])
    >>> merged = checkpoint.load_transfer(path, base)
    >>> merged['a']['kernel'].tolist(), merged['b']['kernel'].tolist()
    ([[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]])
  """
  selection = tuple(selection)
  check_layers_in(selection, deltas, "the changes (deltas)")
  replaced = dict(replaced or {})
  both = [layer for layer in selection if layer in replaced]
  if both:
    raise ValueError(
        f"layers {both} are both selected and replaced; a leaf is either "
        "changed by its dW or stored whole.")
  arrays = {"deltas": [deltas[layer] for layer in selection],
            "replaced": list(replaced.values())}
  metadata = {
      "format": _TRANSFER_FORMAT,
      "selection": list(selection),
      "deltas": [_describe_array(layer, deltas[layer]) for layer in selection],
      "replaced": [_describe_array(p, a) for p, a in replaced.items()],
  }
  items = {TRANSFER_ITEM: ocp.args.JsonSave(metadata)}
  if selection or replaced:
    items[ARRAYS_ITEM] = ocp.args.StandardSave(arrays)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(_absolute(path), args=ocp.args.Composite(**items),
                      force=force)


def load_transfer(path: Union[str, os.PathLike], base_params: PyTree) -> PyTree:
  """The task's model: ``base_params`` with the artefact's changes merged in.

  Args:
    path: the directory written by :func:`save_transfer`.
    base_params: the shared backbone's parameters the changes were trained
      on (the ``W0``), concrete arrays.

  Returns:
    Plain parameters with the structure, shapes and dtypes of
    ``base_params``: ``W0 + dW`` on the selected layers, the replaced leaves
    as saved, ``W0`` elsewhere (see :func:`multirate_optax.budgeted.merge`).

  Raises:
    ValueError: if ``path`` holds no transfer artefact, or a stored layer is
      not in ``base_params`` or has another shape there (naming the layer).

  Example:
    >>> import os, tempfile
    >>> import jax.numpy as jnp
    >>> from multirate_optax import checkpoint
    >>> base = {'a': {'kernel': jnp.zeros((2, 2))}, 'b': {'kernel': jnp.zeros((2, 2))}}
    >>> with tempfile.TemporaryDirectory() as directory:
    ...   path = os.path.join(directory, 'task')
    ...   checkpoint.save_transfer(path, {'b/kernel': jnp.ones((2, 2))}, ['b/kernel'])
    ...   model = checkpoint.load_transfer(path, base)
    ...   try:
    ...     checkpoint.load_transfer(path, {**base, 'b': {'kernel': jnp.zeros((3, 2))}})
    ...   except ValueError as e:
    ...     refusal = str(e)
    >>> model['a']['kernel'].tolist(), model['b']['kernel'].tolist()
    ([[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]])
    >>> print(refusal[refusal.index('holds'):].split(':')[0])
    holds layer 'b/kernel' with shape (2, 2), but the base parameters have shape (3, 2) there
  """
  path = _absolute(path)
  with (ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer,
        _reads_finish_before_their_loop_closes()):
    try:
      metadata = checkpointer.restore(path, args=ocp.args.Composite(**{
          TRANSFER_ITEM: ocp.args.JsonRestore()}))[TRANSFER_ITEM]
    except (FileNotFoundError, KeyError, ValueError) as e:
      raise ValueError(
          f"{path} holds no transfer artefact written by "
          f"multirate_optax.checkpoint.save_transfer ({type(e).__name__}: "
          f"{e}).") from e
    if not isinstance(metadata, dict) or metadata.get(
        "format") != _TRANSFER_FORMAT:
      raise ValueError(
          f"{path} holds transfer metadata of another format "
          f"({str(metadata)[:200]!r}); this version reads format "
          f"{_TRANSFER_FORMAT}.")
    leaves = leaves_by_path(base_params)
    targets = {
        kind: [_target(entry, leaves, path) for entry in metadata[kind]]
        for kind in ("deltas", "replaced")}
    if not (targets["deltas"] or targets["replaced"]):
      return merge(base_params, {}, ())
    arrays = checkpointer.restore(path, args=ocp.args.Composite(**{
        ARRAYS_ITEM: ocp.args.StandardRestore(targets)}))[ARRAYS_ITEM]
  selection = metadata["selection"]
  merged = merge(base_params, dict(zip(selection, arrays["deltas"])),
                 selection)
  whole = {entry["layer"]: array for entry, array
           in zip(metadata["replaced"], arrays["replaced"])}
  return jax.tree_util.tree_map_with_path(
      lambda p, leaf: whole[path_str(p)].astype(leaf.dtype)
      if path_str(p) in whole else leaf, merged)


def _absolute(path: Union[str, os.PathLike]) -> str:
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def _describe_array(layer: str, array: Any) -> dict[str, Any]:
  return {"layer": layer, "shape": list(array.shape),
          "dtype": jax.numpy.dtype(array.dtype).name}


def _target(entry: dict[str, Any], leaves: Mapping[str, Any],
            path: str) -> jax.ShapeDtypeStruct:
  layer, shape = entry["layer"], tuple(entry["shape"])
  if layer not in leaves:
    raise unknown_layer_error(layer, leaves, "the base parameters")
  if tuple(leaves[layer].shape) != shape:
    raise ValueError(
        f"the artefact in {path} holds layer {layer!r} with shape {shape}, "
        f"but the base parameters have shape {tuple(leaves[layer].shape)} "
        "there: load it onto the backbone it was trained from.")
  return jax.ShapeDtypeStruct(shape, jax.numpy.dtype(entry["dtype"]))
