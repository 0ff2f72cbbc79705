"""Building blocks of a transformation that follows a timetable.

:func:`timetabled` keeps the count, the timetable and every leaf's group in a
:class:`~multirate_optax.TimetableState`, partitions the parameters into their
groups, and refuses a state made by a transformation with another timetable or
other labels (the train step takes its phase from the state, so a mismatch
would silently lose updates). :func:`gated` is a group's optimizer that moves
only while its group is active. Multirate, FreezeOut and random subgroups are
each one call of :func:`timetabled` with their own groups.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from multirate_optax.core._groups import labels_like, leaf_paths, path_str
from multirate_optax.core._timetable import Timetable, TimetableState

PyTree = Any
Count = Optional[jax.Array]  # None while the state is initialised.
# The groups active in the phase a train step is tracing, when it says so.
Active = Optional[frozenset[str]]

# The (timetable, phase) a train step is tracing, while it says so.
_TRACED_PHASE: contextvars.ContextVar[Optional[tuple[Timetable, int]]] = (
    contextvars.ContextVar("multirate_optax_traced_phase", default=None))


@contextlib.contextmanager
def tracing_phase(timetable: Timetable, phase: int) -> Iterator[None]:
  """Tells the transformations that follow ``timetable`` the phase traced.

  A train step traces each phase's step on its own (a branch of
  ``lax.switch``, or a program of its own), and knows which phase that is:
  inside this context the update of a :func:`timetabled` transformation with
  this timetable takes its groups' activity from the phase rather than from
  the count, so its gates are Python booleans, not conditionals on the count.
  A conditional would carry every inactive group's optimizer state and
  updates through its branches (copied on each step), and its pass-through
  branch would keep XLA from updating the parameters in place.
  """
  token = _TRACED_PHASE.set((timetable, phase))
  try:
    yield
  finally:
    _TRACED_PHASE.reset(token)


def _active_in_traced_phase(timetable: Timetable) -> Active:
  traced = _TRACED_PHASE.get()
  if traced is None or traced[0] != timetable:
    return None
  return timetable.phases[traced[1]]


class GateState(NamedTuple):
  """State of a group's optimizer that moves only while its group is active.

  Attributes:
    inner: the optimizer's state; it changes on active steps only.
    held: with ``hold=True``, the updates of the last active step, applied
      again on every inactive step; ``None`` otherwise.

  Example:
    The slow group of :func:`~multirate_optax.multirate` (with drift) is
    gated: on a fast step its momentum stays as the slow step left it, and
    the held update (``-0.1`` times the drift's ``1 / period``) is applied
    again.

    >>> import jax, jax.numpy as jnp, optax
    >>> import multirate_optax as mo
    >>> params = {'body': jnp.ones(2), 'head': jnp.ones(2)}
    >>> tx = mo.multirate(optax.sgd(0.1, momentum=0.9),
    ...                   labels={'body': 'slow', 'head': 'fast'}, period=2)
    >>> state = tx.init(params)
    >>> ones = jax.tree.map(jnp.ones_like, params)
    >>> _, state = tx.update(ones, state, params)  # step 0: a slow step
    >>> updates, state = tx.update(jax.tree.map(lambda g: 5 * g, ones),
    ...                            state, params)  # step 1: a fast step
    >>> gate = state.inner.inner_states['slow'].inner_state
    >>> gate.inner[0].trace['body'], gate.held['body']
    (Array([1., 1.], dtype=float32), Array([-0.05, -0.05], dtype=float32))
    >>> updates['body']
    Array([-0.05, -0.05], dtype=float32)
  """

  inner: optax.OptState
  held: Optional[optax.Updates]


def gated(
    inner: optax.GradientTransformation,
    active: Union[bool, jax.Array, None],
    *,
    scale: Union[float, jax.Array] = 1.0,
    hold: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """``inner``'s updates times ``scale`` while ``active``; held otherwise.

  When ``active`` is false the updates are exactly zero (or, with ``hold``,
  those of the last active step) and ``inner``'s state is left untouched, so
  its momentum does not decay and its count does not advance.

  Args:
    inner: the group's optimizer.
    active: whether the group is active on this update (``None`` when only
      ``init`` is used; a Python bool skips the conditional).
    scale: factor on ``inner``'s updates on active steps.
    hold: keep the last active step's updates and repeat them on inactive
      steps (multirate's linear drift).
  """
  inner = optax.with_extra_args_support(inner)
  unscaled = isinstance(scale, (int, float)) and scale == 1

  def init_fn(params):
    held = jax.tree.map(jnp.zeros_like, params) if hold else None
    return GateState(inner.init(params), held)

  def update_fn(updates, state, params=None, **extra_args):
    def run():
      new_updates, new_inner = inner.update(
          updates, state.inner, params, **extra_args)
      if not unscaled:
        new_updates = jax.tree.map(lambda u: (u * scale).astype(u.dtype),
                                   new_updates)
      if hold:
        new_updates = jax.tree.map(lambda u, h: u.astype(h.dtype),
                                   new_updates, state.held)
      return new_updates, GateState(new_inner, new_updates if hold else None)

    def stay():
      if hold:
        return state.held, state
      shapes, _ = jax.eval_shape(run)
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), state

    if active is True:
      return run()
    if active is False:
      return stay()
    return jax.lax.cond(active, run, stay)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def timetabled(
    timetable: Timetable,
    *,
    labels: Callable[[PyTree], tuple[str, ...]],
    groups: Callable[[Count, Active],
                     Mapping[str, optax.GradientTransformation]],
) -> optax.GradientTransformationExtraArgs:
  """A transformation that follows ``timetable``, one optimizer per group.

  Args:
    timetable: the timetable the train step will follow.
    labels: given the parameters (or updates with their structure), the group
      of every leaf in ``jax.tree.leaves`` order; raises a clear error for
      parameters it cannot label.
    groups: given the count of the update (``None`` in ``init``) and, when a
      train step traces one phase (see :func:`tracing_phase`), the groups
      active in it (else ``None``: activity follows the count), the optimizer
      of each group, as for :func:`optax.partition`.

  Returns:
    A transformation whose state is a :class:`TimetableState`.
  """

  # The labels found at init, by tree structure: labels read off the order of
  # a mapping (fast_by_depth, layers_by_module) must not change when checked
  # on parameters whose keys a JAX transformation has sorted.
  labelled: dict[Any, tuple[str, ...]] = {}

  def labels_of(tree: PyTree) -> tuple[str, ...]:
    treedef = jax.tree.structure(tree)
    if treedef not in labelled:
      labelled[treedef] = labels(tree)
    return labelled[treedef]

  def partition(count: Count, active: Active, per_leaf: tuple[str, ...]):
    return optax.partition(groups(count, active), labels_like(per_leaf))

  def init_fn(params):
    per_leaf = labels_of(params)
    inner = partition(None, None, per_leaf).init(params)
    return TimetableState(count=jnp.zeros([], jnp.int32), inner=inner,
                          timetable=timetable, labels=per_leaf)

  # The inner state init would build, by the parameters' structure, shapes
  # and dtypes and the labels: found once per trace (jax.eval_shape, no
  # computation), to check the state given to update.
  made_by_init: dict[Any, Any] = {}

  def inner_of_init(tree: PyTree, per_leaf: tuple[str, ...]) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    specs = [(jnp.shape(x), jnp.result_type(x)) for x in leaves]
    key = (treedef, per_leaf, tuple(specs))
    try:
      return made_by_init[key]
    except KeyError:
      pass
    except TypeError:  # A tree with unhashable static data: not kept.
      key = None
    abstract = jax.tree.unflatten(
        treedef, [jax.ShapeDtypeStruct(*spec) for spec in specs])
    try:
      inner = jax.eval_shape(partition(None, None, per_leaf).init, abstract)
    except Exception:  # pylint: disable=broad-except
      # An init that reads values (not traceable): nothing to compare with;
      # the update itself says what is wrong, if anything.
      inner = None
    if key is not None:
      made_by_init[key] = inner
    return inner

  def update_fn(updates, state, params=None, **extra_args):
    tree = updates if params is None else params
    _check_made_here(state, timetable, labels_of, tree)
    _check_inner_state(state.inner, inner_of_init(tree, state.labels), tree)
    active = _active_in_traced_phase(timetable)
    updates, inner = partition(state.count, active, state.labels).update(
        updates, state.inner, params, **extra_args)
    return updates, state.advanced(inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_made_here(state: Any, timetable: Timetable,
                     labels: Callable[[PyTree], tuple[str, ...]],
                     tree: PyTree) -> None:
  """Raises unless ``state`` has this transformation's timetable and labels."""
  if not isinstance(state, TimetableState):
    raise TypeError(
        f"expected the state made by this transformation's init, a "
        f"TimetableState, got {type(state).__name__}.")
  advice = ("Call this optimizer's init for the state, or build the optimizer "
            "with the arguments of the one that made it.")
  if state.timetable != timetable:
    raise ValueError(
        f"the optimizer state was made for {state.timetable!r}, but this "
        f"optimizer follows {timetable!r}: the train step takes its phase from "
        f"the state, so updates would be lost. {advice}")
  found = len(jax.tree.leaves(tree))
  if found != len(state.labels):
    raise ValueError(
        f"the updates: tree has {found} leaves but the optimizer state was "
        f"made for parameters with {len(state.labels)} leaves; call init "
        "again with parameters of this structure.")
  expected = labels(tree)
  if expected != state.labels:
    paths = leaf_paths(tree)
    differ = [f"{paths[i]!r}: state {s!r}, this optimizer {e!r}"
              for i, (s, e) in enumerate(zip(state.labels, expected)) if s != e]
    raise ValueError(
        f"the optimizer state was made with other labels than this optimizer "
        f"gives the parameters ({len(differ)} of {found} leaves differ: "
        f"{'; '.join(differ[:5])}{'; ...' if len(differ) > 5 else ''}). "
        + advice)


def _is_leaf(treedef: jax.tree_util.PyTreeDef) -> bool:
  # Not jax.tree_util.treedef_is_leaf: that is true of an empty node too
  # (optax.EmptyState).
  return treedef.num_nodes == 1 and treedef.num_leaves == 1


def _node(treedef: jax.tree_util.PyTreeDef) -> tuple[Any, Any, int]:
  """A tree's root node: its type (lists as tuples: a restored checkpoint may
  hold either), static data and number of children; ``None`` for a leaf."""
  if _is_leaf(treedef):
    return None
  kind, data = treedef.node_data()
  return (tuple if kind is list else kind), data, len(treedef.children())


def _child_names(treedef: jax.tree_util.PyTreeDef) -> list[str]:
  kind, data = treedef.node_data()
  if isinstance(data, (list, tuple)) and len(data) == len(treedef.children()):
    return [str(k) for k in data]  # A dict's keys.
  fields = getattr(kind, "_fields", None)
  if fields is not None and len(fields) == len(treedef.children()):
    return list(fields)
  return [str(i) for i in range(len(treedef.children()))]


def _describe(treedef: jax.tree_util.PyTreeDef, depth: int = 2) -> str:
  """A short description of a state's structure: its node types."""
  if _is_leaf(treedef):
    return "array"
  kind, _ = treedef.node_data()
  if kind in (tuple, list) or depth == 0:
    if kind not in (tuple, list):
      return kind.__name__
    inner = ", ".join(_describe(c, depth - 1) for c in treedef.children())
    return f"({inner})" if depth else f"{kind.__name__}(...)"
  if kind is dict:
    names = _child_names(treedef)
    return "{" + ", ".join(names[:4]) + (", ..." if len(names) > 4 else "") + "}"
  return kind.__name__


def _first_difference(found: jax.tree_util.PyTreeDef,
                      expected: jax.tree_util.PyTreeDef,
                      path: tuple[str, ...] = ()) -> Optional[tuple[Any, ...]]:
  """``(path, found, expected)`` at the first node where two structures
  differ (lists and tuples alike), or ``None`` if they do not."""
  if _node(found) != _node(expected):
    return path, found, expected
  if _node(found) is None:
    return None
  for name, f, e in zip(_child_names(expected), found.children(),
                        expected.children()):
    difference = _first_difference(f, e, (*path, name))
    if difference is not None:
      return difference
  return None


def _check_inner_state(found: Any, expected: Any, tree: PyTree) -> None:
  """Raises if the groups' optimizer state ``found`` is not what this
  transformation's init makes for ``tree`` (``expected``, abstract): a state
  of other inner optimizers, or of parameters of other shapes."""
  if expected is None:
    return
  advice = ("Make the state with this optimizer's init (tx.init(params)), or "
            "build the optimizer with the inner optimizers that made it (a "
            "checkpoint restored with the optimizer that wrote it).")
  per_group = (isinstance(found, optax.PartitionState)
               and isinstance(expected, optax.PartitionState)
               and isinstance(found.inner_states, Mapping)
               and set(found.inner_states) == set(expected.inner_states))
  parts = ([(g, found.inner_states[g], expected.inner_states[g])
            for g in expected.inner_states] if per_group
           else [(None, found, expected)])
  differ = []
  for group, f, e in parts:
    f_structure, e_structure = jax.tree.structure(f), jax.tree.structure(e)
    if f_structure == e_structure:
      continue  # The common case, compared in C++.
    difference = _first_difference(f_structure, e_structure)
    if difference is not None:
      where, f_node, e_node = difference
      differ.append(
          (f"group {group!r}: " if group is not None else "")
          + f"the state holds {_describe(f_node)} where this optimizer's "
          f"init makes {_describe(e_node)}"
          + (f" (at {'/'.join(where)})" if where else ""))
  if differ:
    raise TypeError(
        "the optimizer state was made by a transformation with other inner "
        "optimizers than this one: " + "; ".join(differ) + ". " + advice)
  _check_state_shapes(found, expected, tree)


def _check_state_shapes(found: Any, expected: Any, tree: PyTree) -> None:
  """Raises, naming the parameters, if ``found``'s leaves have other shapes
  than ``expected``'s (the state of parameters of other shapes)."""
  found_leaves = jax.tree_util.tree_flatten_with_path(found)[0]
  expected_leaves = jax.tree.leaves(expected)
  param_paths = leaf_paths(tree)
  differ: dict[str, tuple[Any, Any]] = {}
  for (path, f), e in zip(found_leaves, expected_leaves, strict=True):
    if tuple(jnp.shape(f)) == tuple(e.shape):
      continue
    state_path = path_str(path)
    # The parameter whose path ends the state leaf's (mu/head/w: head/w).
    owners = [p for p in param_paths
              if state_path == p or state_path.endswith("/" + p)]
    name = (f"parameter {max(owners, key=len)!r}" if owners
            else f"state leaf {state_path!r}")
    differ.setdefault(name, (tuple(e.shape), tuple(jnp.shape(f))))
  if differ:
    listed = [f"{name} has shape {got}, the state was made for {made}"
              for name, (got, made) in differ.items()]
    raise ValueError(
        "the parameters do not have the shapes the optimizer state was made "
        f"for: {'; '.join(listed[:5])}{'; ...' if len(listed) > 5 else ''}. "
        "Call this optimizer's init on these parameters for a new state, or "
        "pass the parameters the state was made for (a model of the same "
        "sizes, the checkpoint's parameters).")

