"""The NNX train step, and labels from an nnx filter."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import optax
from flax import nnx
from flax.training.dynamic_scale import DynamicScale
from flax.nnx import graphlib

from multirate_optax.core._dispatch import Dispatch, PhaseDispatch, resolve_dispatch
from multirate_optax.core._gradients import (
    checked_loss, check_loss_signature, describe, value_and_active_grad)
from multirate_optax.core._groups import FAST, SLOW
from multirate_optax.core._timetable import find_timetable_state
from multirate_optax.core._train_step import loss_scaled_update


def fast_by_filter(
    fast: nnx.filterlib.Filter) -> Callable[[nnx.State], nnx.State]:
  """Labels the parameters that ``fast`` selects ``'fast'``, the rest ``'slow'``.

  Args:
    fast: an nnx filter on (path, variable), e.g. ``nnx.PathContains('head')``
      or ``nnx.All(nnx.Param, nnx.PathContains('head'))``.

  Returns:
    A labels function for :func:`multirate_optax.multirate`, applied by
    ``nnx.Optimizer`` to ``nnx.state(model, wrt)``.

  Raises:
    ValueError: when applied, if the filter selects no parameter.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import multirate_optax as mo
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.body = nnx.Linear(3, 8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 2, rngs=rngs)
    >>> labels = mo.nnx.fast_by_filter(nnx.PathContains('head'))
    >>> nnx.to_pure_dict(labels(nnx.state(Net(nnx.Rngs(0)), nnx.Param)))
    {'body': {'bias': 'slow', 'kernel': 'slow'}, 'head': {'bias': 'fast', 'kernel': 'fast'}}
  """
  predicate = nnx.filterlib.to_predicate(fast)
  # Filters may test a variable's type, which a state of plain arrays (what
  # nnx.Optimizer passes to update) no longer has: the labels found on a
  # state of variables are kept, by parameter paths, for its plain twin.
  found: dict[tuple[Any, ...], nnx.State] = {}

  def labels(params: nnx.State) -> nnx.State:
    if not isinstance(params, nnx.State):
      raise TypeError(
          "fast_by_filter labels an nnx.State (what nnx.Optimizer passes to "
          f"its optimizer's init), got {type(params).__name__}.")
    flat = list(nnx.to_flat_state(params))
    paths = tuple(path for path, _ in flat)
    if not any(isinstance(v, nnx.Variable) for _, v in flat):
      if paths not in found:
        raise ValueError(
            "fast_by_filter was given a state of plain arrays before the "
            "state of variables with the same paths (nnx.state(model, wrt), "
            "as nnx.Optimizer passes to init): its filter may need the "
            "variables' types.")
      return found[paths]
    label_tree = nnx.map_state(
        lambda path, variable: FAST if predicate(path, variable) else SLOW,
        params)
    if FAST not in jax.tree.leaves(label_tree):
      paths = ["/".join(map(str, path))
               for path, _ in nnx.to_flat_state(params)]
      raise ValueError(
          f"the fast filter {fast!r} selects none of the {len(paths)} "
          f"parameters; their paths: {paths[:8]}"
          + (" ..." if len(paths) > 8 else "") + ".")
    found[paths] = nnx.map_state(lambda _, label: label, label_tree)
    return label_tree

  return labels


def _is_graph_node(x: Any) -> bool:
  """Whether ``nnx.jit`` would split ``x`` into state: a graph node (a module,
  rng streams, metrics, an optimizer) or a variable."""
  return type(x) in graphlib.GRAPH_REGISTRY or isinstance(x, nnx.Variable)


class _NodesAt(NamedTuple):
  """Where the graph nodes are among a step's extra arguments.

  ``structure`` is the arguments' tree structure with each graph node a leaf,
  ``leaves`` the indices of those leaves. The step's program is given the
  arguments with ``None`` in the nodes' places and the nodes' state with the
  model's (see :func:`_split`), and merges them back into their places.
  """

  structure: jax.tree_util.PyTreeDef
  leaves: tuple[int, ...]

  def take(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...],
                                                 tuple[Any, ...]]:
    """The graph nodes in ``args``, and ``args`` with ``None`` in their places."""
    leaves = self.structure.flatten_up_to(args)
    nodes = tuple(leaves[i] for i in self.leaves)
    for i in self.leaves:
      leaves[i] = None
    return nodes, self.structure.unflatten(leaves)

  def put(self, args: tuple[Any, ...],
          nodes: Sequence[Any]) -> tuple[Any, ...]:
    """``args`` with ``nodes`` back in their places."""
    leaves = self.structure.flatten_up_to(args)
    for i, node in zip(self.leaves, nodes, strict=True):
      leaves[i] = node
    return self.structure.unflatten(leaves)


def _nodes_at(args: tuple[Any, ...]) -> Optional[_NodesAt]:
  """Where the graph nodes in ``args`` are, as ``nnx.jit`` finds them; ``None``
  if there are none."""
  leaves, structure = jax.tree.flatten(args, is_leaf=_is_graph_node)
  found = tuple(i for i, leaf in enumerate(leaves) if _is_graph_node(leaf))
  return _NodesAt(structure, found) if found else None


class _GraphArgs:
  """Finds the graph nodes among a step's extra arguments, by the arguments'
  tree structure (read in C++, a fraction of a microsecond for a batch)."""

  def __init__(self):
    self._found: dict[jax.tree_util.PyTreeDef, Optional[_NodesAt]] = {}

  def __call__(self, args: tuple[Any, ...]) -> tuple[
      Optional[_NodesAt], tuple[Any, ...], tuple[Any, ...]]:
    """Where the graph nodes are, the nodes, and ``args`` without them."""
    structure = jax.tree.structure(args)
    try:
      where = self._found.get(structure, False)
      if where is False:
        where = self._found[structure] = _nodes_at(args)
    except TypeError:  # A structure with unhashable static data.
      where = _nodes_at(args)
    if where is None:
      return None, (), args
    nodes, args = where.take(args)
    return where, nodes, args


def _in_model(path: tuple[Any, ...], _: Any) -> bool:
  """Whether a path of the split ``(model, nodes)`` is in the model."""
  return path[0] == 0


def _params_filter(wrt: nnx.filterlib.Filter) -> nnx.filterlib.Filter:
  """The model's parameters under ``wrt``, in the split ``(model, nodes)``.

  A variable shared by the model and a node is the model's (the first path
  ``nnx.split`` finds), so it is one variable, in one place, as under
  ``nnx.jit``.
  """
  return nnx.All(wrt, _in_model)


class _Split(NamedTuple):
  """A model, optimizer and graph-node arguments split into the step's pure
  arguments, kept.

  The step's arguments are ``(params, opt_state, rest, count)``: ``params`` and
  ``rest`` as flat lists of the variables' values (rebuilt into states inside
  the traced step, so a call flattens no ``nnx.State``), ``opt_state`` as the
  optimizer's pure state (the dispatch reads its count). ``rest`` holds the
  model's other variables and those of the graph nodes among the step's extra
  arguments (``nodes``, found at ``where``: rng streams, metrics, other
  modules), which are split with the model as ``nnx.jit`` splits its
  arguments. ``variables`` lists the variables of the four in that order, so
  that a call reads and writes their values in a flat loop instead of
  traversing the module graph (``nnx.split`` costs several times the core
  step's dispatch on a small model). ``dicts`` and ``lists`` are what the
  split saw of every mutable node of the graph, to tell when it no longer
  holds.
  """

  model: nnx.Module
  optimizer: nnx.Optimizer
  where: Optional[_NodesAt]
  nodes: tuple[Any, ...]
  graphdef: nnx.GraphDef
  params: jax.tree_util.PyTreeDef
  opt_state: jax.tree_util.PyTreeDef
  rest: jax.tree_util.PyTreeDef
  variables: list[nnx.Variable]
  dicts: list[tuple[dict[Any, Any], tuple[Any, ...], tuple[int, ...]]]
  lists: list[tuple[list[Any], tuple[int, ...]]]

  def unchanged(self, model: nnx.Module, optimizer: nnx.Optimizer,
                where: Optional[_NodesAt], nodes: tuple[Any, ...]) -> bool:
    return (model is self.model and optimizer is self.optimizer
            and where == self.where
            and len(nodes) == len(self.nodes)
            and all(a is b for a, b in zip(nodes, self.nodes))
            and all(tuple(members) == keys
                    and tuple(map(id, members.values())) == ids
                    for members, keys, ids in self.dicts)
            and all(tuple(map(id, members)) == ids
                    for members, ids in self.lists))

  def pure(self) -> tuple[Any, ...]:
    values = [v.get_raw_value() for v in self.variables]
    i, j = self.params.num_leaves, -1 - self.rest.num_leaves
    return (values[:i], self.opt_state.unflatten(values[i:j]), values[j:-1],
            values[-1])

  def write_back(self, outputs: Sequence[Any]) -> Any:
    params, opt_state, rest, count, value = outputs
    values = [*params, *self.opt_state.flatten_up_to(opt_state), *rest, count]
    # Variable.set_raw_value checks the trace level on every write (a few µs
    # each, as much as the whole step of a small model): check it once, on
    # the first, for all of them.
    first, *others = self.variables
    first.set_raw_value(values[0])
    for variable, new in zip(others, values[1:], strict=True):
      variable.set_raw_value(new, _unsafe_bypass_check=True)
    return value


def _mutable_members(*roots: Any) -> tuple[list[dict[Any, Any]], list[list[Any]]]:
  """The attribute dicts of modules and optimizers, the dicts and the lists
  reachable from ``roots``.

  Any change to the graph's structure (a module, variable or static
  attribute added, removed or replaced; ``model.eval()``) rebinds a member of
  one of them; a variable's value changing is no change.
  """
  dicts, lists, seen, stack = [], [], set(), list(roots)
  while stack:
    node = stack.pop()
    if id(node) in seen or isinstance(node, nnx.Variable):
      continue
    seen.add(id(node))
    if isinstance(node, (nnx.Pytree, dict)):
      members = vars(node) if isinstance(node, nnx.Pytree) else node
      dicts.append(members)
      stack.extend(members.values())
    elif isinstance(node, (list, tuple)):
      if isinstance(node, list):
        lists.append(node)
      stack.extend(node)
  return dicts, lists


def _split(model: nnx.Module, optimizer: nnx.Optimizer,
           where: Optional[_NodesAt] = None,
           nodes: tuple[Any, ...] = ()) -> _Split:
  if any(node is optimizer for node in nodes):
    raise TypeError(
        "the nnx.Optimizer was given again among the step's extra arguments: "
        "the step updates it itself; pass it once, as the second argument.")
  graphdef, params, rest = nnx.split(
      (model, nodes), _params_filter(optimizer.wrt), ...)
  params = params[0] if 0 in params else nnx.State({})
  is_variable = lambda x: isinstance(x, nnx.Variable)
  parts = (params, optimizer.opt_state, rest)
  variables = jax.tree.leaves((*parts, optimizer.step), is_leaf=is_variable)
  if any(v.ref or v.hijax for v in variables):
    raise NotImplementedError(
        "mo.nnx.train_step does not support variables held as array "
        "references (ref=True or hijax=True); create the model without them.")
  dicts, lists = _mutable_members(model, optimizer, *nodes)
  return _Split(
      model, optimizer, where, nodes, graphdef,
      *(jax.tree.structure(part, is_leaf=is_variable) for part in parts),
      variables,
      [(d, tuple(d), tuple(map(id, d.values()))) for d in dicts],
      [(l, tuple(map(id, l))) for l in lists])


def _split_dynamic_scale(expected: bool, args: Sequence[Any]
                         ) -> tuple[Optional[DynamicScale], list[Any]]:
  """The loss scale leading ``args``; refuses a missing or an unasked one."""
  args = list(args)
  if expected:
    if not (args and isinstance(args[0], DynamicScale)):
      raise TypeError(
          "a step built with dynamic_scale=True is called as dynamic_scale, "
          "value = step(model, optimizer, dynamic_scale, *args), with Flax's "
          "flax.training.dynamic_scale.DynamicScale after the optimizer; got "
          + (describe(args[0]) if args else "nothing") + " there.")
    return args[0], args[1:]
  found = [i for i, a in enumerate(args) if isinstance(a, DynamicScale)]
  if found:
    raise TypeError(
        f"argument {found[0] + 3} of the step (counting the model and the "
        "optimizer) is a DynamicScale, but the step was built without "
        "dynamic_scale=True: it would be handed to loss_fn, with no loss "
        "scaling. Build it with mo.nnx.train_step(loss_fn, dynamic_scale="
        "True) and call it as dynamic_scale, value = step(model, optimizer, "
        "dynamic_scale, *args).")
  return None, args


class TrainStep:
  """A multirate train step on an ``nnx.Module`` and its ``nnx.Optimizer``.

  Call it as ``value = step(model, optimizer, *args)``; it updates ``model``
  and ``optimizer`` (and the graph nodes among ``args``) in place and
  returns what ``loss_fn(model, *args)`` returns (``dynamic_scale, value =
  step(model, optimizer, dynamic_scale, *args)`` when built with
  ``dynamic_scale=True``). Build it with :func:`train_step`.

  The phase comes from the count of the timetable state inside
  ``optimizer``, as in :class:`multirate_optax.TrainStep`, with the same
  ``'cond'`` and ``'host'`` dispatch. One engine is kept per optimizer
  transformation (``optimizer.tx``) and graph structure, so compiled programs
  and the host-side count carry over from call to call. The split of the
  model and optimizer is kept too, and made again only when their structure
  changes (a submodule or variable replaced, ``model.eval()``), which each
  call checks by the identity of every attribute.

  Example:
    Called on its own, and its :meth:`apply` inside an ``nnx.jit`` of your
    own (two steps per call here), which follow the same timetable:

    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import multirate_optax as mo
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.body = nnx.Linear(3, 8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(nnx.relu(self.body(x)))
    >>> tx = mo.multirate(optax.sgd(0.01),
    ...                   labels=mo.nnx.fast_by_filter(nnx.PathContains('head')),
    ...                   period=4)
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((model(x) - y) ** 2)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> step = mo.nnx.train_step(loss_fn, dispatch='cond')
    >>> @nnx.jit
    ... def two_steps(model, optimizer, x, y):
    ...   step.apply(model, optimizer, x, y)
    ...   return step.apply(model, optimizer, x, y)
    >>> model, other = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> other_optimizer = nnx.Optimizer(other, tx, wrt=nnx.Param)
    >>> loss = two_steps(model, optimizer, x, y)
    >>> for _ in range(2):
    ...   other_loss = step(other, other_optimizer, x, y)
    >>> step.dispatch, int(optimizer.step[...]), int(other_optimizer.step[...])
    ('cond', 2, 2)
    >>> bool(jnp.allclose(loss, other_loss)
    ...      & jnp.allclose(model.body.kernel[...], other.body.kernel[...]))
    True
  """

  def __init__(self, loss_fn: Callable[..., Any], *, has_aux: bool,
               dispatch: Dispatch, donate: bool, dynamic_scale: bool = False):
    if not callable(loss_fn):
      raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    self._loss_fn = loss_fn
    self._has_aux = has_aux
    self._dynamic_scale = dynamic_scale
    self.dispatch = resolve_dispatch(dispatch)
    self._donate = donate
    self._dispatches: dict[tuple[Any, ...], PhaseDispatch] = {}
    self._graph_args = _GraphArgs()
    # The split of the model and optimizer last stepped, and its engine.
    self._kept: Optional[tuple[_Split, PhaseDispatch]] = None

  def _engine(self, split: _Split) -> PhaseDispatch:
    tx, wrt = split.optimizer.tx, split.optimizer.wrt
    key = (tx, wrt, split.where, split.graphdef, split.params,
           split.opt_state, split.rest)
    if key not in self._dispatches:
      # Arguments: params, opt_state, rest, count, *args (None in the graph
      # nodes' places); the outputs keep the first four in their places.
      self._dispatches[key] = PhaseDispatch(
          functools.partial(self._step_of_phase, tx, wrt, split.where,
                            split.graphdef, split.params, split.rest),
          state_argnum=1, dispatch=self.dispatch,
          donate_argnums=(0, 1, 2, 3) if self._donate else (),
          own_jit_hint="For your own jitted NNX step with host dispatch, "
          "decorate it with multirate_optax.nnx.jit and take gradients with "
          "multirate_optax.nnx.value_and_grad.")
    return self._dispatches[key]

  def _step_of_phase(self, tx: optax.GradientTransformation,
                     wrt: nnx.filterlib.Filter, where: Optional[_NodesAt],
                     graphdef: nnx.GraphDef,
                     params_structure: jax.tree_util.PyTreeDef,
                     rest_structure: jax.tree_util.PyTreeDef, phase: int,
                     params, opt_state, rest, count, *args):
    """The pure step of one phase on the split model, optimizer and nodes."""
    dynamic_scale, args = _split_dynamic_scale(self._dynamic_scale, args)
    check_loss_signature(self._loss_fn, len(args))
    params = params_structure.unflatten(params)
    rest = rest_structure.unflatten(rest)
    user_loss = checked_loss(self._loss_fn, self._has_aux)

    def loss(params, rest, *args):
      model, nodes = nnx.merge(graphdef, nnx.State({0: params}), rest)
      if where is not None:
        args = where.put(args, nodes)
      value = user_loss(model, *args)
      _, _, new_rest = nnx.split((model, nodes), _params_filter(wrt), ...)
      new_rest = nnx.as_pure(new_rest)
      loss_value = value[0] if self._has_aux else value
      return loss_value, (value, new_rest)

    if self._dynamic_scale:
      # The model's other state (BatchNorm statistics) is kept from the
      # forward pass on a skipped step too, as in Flax's examples.
      params, opt_state, dynamic_scale, (_, (value, rest)) = (
          loss_scaled_update(tx, loss, True, phase, dynamic_scale, params,
                             opt_state, rest, *args))
      value = (dynamic_scale, value)
    else:
      (_, (value, rest)), grads = value_and_active_grad(
          loss, find_timetable_state(opt_state).active(phase), has_aux=True)(
              params, rest, *args)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return (params_structure.flatten_up_to(params), opt_state,
            rest_structure.flatten_up_to(rest), optax.safe_increment(count),
            value)

  def _kept_split(self, model: nnx.Module, optimizer: nnx.Optimizer,
                  args: tuple[Any, ...]
                  ) -> tuple[_Split, PhaseDispatch, tuple[Any, ...]]:
    """The kept split and its engine, and ``args`` without graph nodes."""
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(
          f"expected an nnx.Optimizer, got {type(optimizer).__name__}.")
    scale, args = self._scale_and_rest(args)
    where, nodes, args = self._graph_args(args)
    if (self._kept is None
        or not self._kept[0].unchanged(model, optimizer, where, nodes)):
      split = _split(model, optimizer, where, nodes)
      self._kept = (split, self._engine(split))
    return (*self._kept, scale + args)

  def _scale_and_rest(self, args: tuple[Any, ...]
                      ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The loss scale (``(dynamic_scale,)``, or ``()``) and the arguments
    after it: graph nodes are found among the latter, as the loss sees them."""
    return (args[:1], args[1:]) if self._dynamic_scale else ((), args)

  def __call__(self, model: nnx.Module, optimizer: nnx.Optimizer, *args):
    split, engine, args = self._kept_split(model, optimizer, args)
    return split.write_back(engine(*split.pure(), *args))

  def apply(self, model: nnx.Module, optimizer: nnx.Optimizer, *args):
    """The step choosing the phase with ``jax.lax.switch``, traceable.

    Use it inside your own ``nnx.jit`` (or ``jax.jit`` over split state).
    """
    if not isinstance(optimizer, nnx.Optimizer):
      raise TypeError(
          f"expected an nnx.Optimizer, got {type(optimizer).__name__}.")
    # Under a transformation the model, optimizer and nodes are fresh copies
    # on each trace: nothing to keep.
    scale, args = self._scale_and_rest(args)
    where, nodes, args = self._graph_args(args)
    split = _split(model, optimizer, where, nodes)
    return split.write_back(
        self._engine(split).apply(*split.pure(), *scale, *args))

  def program(self, model: nnx.Module, optimizer: nnx.Optimizer, *args,
              phase: Optional[int] = None) -> jax.stages.Lowered:
    """The lowered program run for these arguments, to inspect or compile.

    Args:
      model, optimizer, args: as for a call (and the other arguments).
      phase: the phase whose ``'host'`` program to return; ``None`` returns
        the single ``lax.switch`` program of ``'cond'``.
    """
    split, engine, args = self._kept_split(model, optimizer, args)
    return engine.program(*split.pure(), *args, phase=phase)


def train_step(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    dispatch: Dispatch = "auto",
    donate: bool = False,
    dynamic_scale: bool = False,
) -> TrainStep:
  """Builds a multirate train step for an ``nnx.Module`` and ``nnx.Optimizer``.

  The optimizer is ``nnx.Optimizer(model, tx, wrt=...)`` with ``tx`` containing
  one :func:`multirate_optax.multirate` (labels from :func:`fast_by_filter`,
  or any labels that fit ``nnx.state(model, wrt)``). On slow steps every
  parameter under ``wrt`` is differentiated, on fast steps only the fast ones;
  the optimizer sees zeros for the rest, which multirate ignores.

  NNX graph nodes among the extra arguments (``nnx.Rngs`` for dropout, an
  ``nnx.MultiMetric``, another module; anywhere in the arguments' pytrees)
  are handled as ``nnx.jit`` handles them: split to state with the model
  before the compiled program, merged inside it, and their new state written
  back after the step, on fast and slow steps alike, so rng streams advance
  and metrics update in place. A variable the model and a node share is one
  variable. Their state is carried through the program, not differentiated.

  Args:
    loss_fn: ``loss_fn(model, *args) -> loss`` or ``(loss, aux)``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    dispatch: ``'cond'``, ``'host'`` or ``'auto'``, as in
      :func:`multirate_optax.train_step`.
    donate: donate the model's and optimizer's buffers to the step, to save
      memory: arrays read from the model and optimizer before the call (a
      state kept with ``nnx.state``, say) are then deleted. ``False`` (the
      default) keeps them usable.
    dynamic_scale: take Flax's ``flax.training.dynamic_scale.DynamicScale``
      (loss scaling for float16) after the optimizer and return the new one:
      ``dynamic_scale, value = step(model, optimizer, dynamic_scale, *args)``.
      As :func:`multirate_optax.train_step` with ``dynamic_scale=True``: the
      loss is scaled, the gradients unscaled, and a step with non-finite
      gradients keeps the parameters and the optimizer state (its timetable
      count too under ``'cond'`` dispatch, so the phase is retried; under
      ``'host'`` the count advances, with a warning when a slow update is
      missed) and lowers the scale. The model's other variables (BatchNorm
      statistics, rng counts) keep what the forward pass wrote, and
      ``optimizer.step`` advances, as in Flax's examples. Without it, a
      ``DynamicScale`` among the arguments is refused.

  Returns:
    A :class:`TrainStep`: ``value = step(model, optimizer, *args)`` updates
    both in place (``dynamic_scale, value = ...`` with ``dynamic_scale=True``).
    For your own ``nnx.jit`` use its ``apply`` method.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import multirate_optax as mo
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.body = nnx.Linear(3, 8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(nnx.relu(self.body(x)))
    >>> model = Net(nnx.Rngs(0))
    >>> tx = mo.multirate(optax.sgd(0.01),
    ...                   labels=mo.nnx.fast_by_filter(nnx.PathContains('head')),
    ...                   period=4)
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((model(x) - y) ** 2)
    >>> step = mo.nnx.train_step(loss_fn)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
    >>> for _ in range(8):
    ...   loss = step(model, optimizer, x, y)
    >>> int(optimizer.step[...])
    8

    Loss scaling for float16 with Flax's ``DynamicScale``: a batch with a
    NaN is skipped, the scale halved.

    >>> from flax.training.dynamic_scale import DynamicScale
    >>> scaled = mo.nnx.train_step(loss_fn, dispatch='cond', dynamic_scale=True)
    >>> kernel = model.head.kernel[...]
    >>> scale, loss = scaled(model, optimizer, DynamicScale(),
    ...                      jnp.full((8, 3), jnp.nan), y)
    >>> float(scale.scale), bool((model.head.kernel[...] == kernel).all())
    (32768.0, True)

    Rng streams and metrics given to the step update in place:

    >>> def dropout_loss(model, x, y, rngs, metrics):
    ...   loss = loss_fn(model, nnx.Dropout(0.5)(x, rngs=rngs), y)
    ...   metrics.update(loss=loss)
    ...   return loss
    >>> dropout_step = mo.nnx.train_step(dropout_loss)
    >>> rngs, metrics = nnx.Rngs(dropout=1), nnx.metrics.Average('loss')
    >>> for _ in range(3):
    ...   loss = dropout_step(model, optimizer, x, y, rngs, metrics)
    >>> int(rngs.dropout.count[...]), int(metrics.count[...])
    (3, 3)
  """
  return TrainStep(loss_fn, has_aux=has_aux, dispatch=dispatch, donate=donate,
                   dynamic_scale=dynamic_scale)
