"""Parameter groups: which group each parameter leaf belongs to.

Labels follow :func:`optax.partition`'s conventions: a pytree of group names with
the structure of the parameters (or a prefix of it), or a callable that returns
one given the parameters. Here they are resolved once, at ``init``, into one
group name per parameter leaf (in ``jax.tree.leaves`` order) and validated, so
that mistakes are reported with the leaf's path before any step runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Optional, Union

import jax

from multirate_optax.core._checks import not_a_step_count, whole_number

PyTree = Any
Labels = Union[PyTree, Callable[[PyTree], PyTree]]

FAST = "fast"
SLOW = "slow"


def path_str(path: Sequence[Any]) -> str:
  """Joins a key path into a '/'-separated string such as ``Dense_0/kernel``.

  These are the strings that :func:`fast_by_path` and :func:`groups_by_path`
  search their patterns in, and that error messages name leaves by.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 2)), 'bias': jnp.zeros(2)},
    ...           'blocks': [jnp.ones(1)]}
    >>> paths, _ = zip(*jax.tree_util.tree_flatten_with_path(params)[0])
    >>> [mo.path_str(path) for path in paths]
    ['Dense_0/bias', 'Dense_0/kernel', 'blocks/0']
  """
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return "/".join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
  """The '/'-joined path of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def structure_mismatch(label_tree: PyTree, params: PyTree,
                       kind: str = "labels", values: str = "group names") -> str:
  """What does not fit between ``label_tree`` (of ``values``) and ``params``."""
  label_paths = leaf_paths(label_tree)
  param_paths = leaf_paths(params)

  def covered(param_path: str) -> bool:
    return any(
        lp == "" or param_path == lp or param_path.startswith(lp + "/")
        for lp in label_paths)

  unlabelled = [p for p in param_paths if not covered(p)]
  unknown = [
      lp for lp in label_paths
      if not any(p == lp or p.startswith(lp + "/") for p in param_paths)]
  lines = [f"{kind} do not match the structure of the parameters "
           f"(expected a pytree of {values} with the parameters' structure "
           "or a prefix of it)."]
  if unlabelled:
    lines.append(f"  parameters without a {kind[:-1]}: {unlabelled[:5]}"
                 + (" ..." if len(unlabelled) > 5 else ""))
  if unknown:
    lines.append(f"  {kind} for paths the parameters do not have: {unknown[:5]}"
                 + (" ..." if len(unknown) > 5 else ""))
  if not unlabelled and not unknown:
    lines.append(f"  {kind}: {jax.tree.structure(label_tree)}\n"
                 f"  params: {jax.tree.structure(params)}")
  return "\n".join(lines)


def resolve_labels(
    labels: Labels, params: PyTree, groups: Collection[str]
) -> tuple[str, ...]:
  """Resolves ``labels`` into one group name per leaf of ``params``.

  Args:
    labels: a pytree of group names with the structure of ``params`` (or a
      prefix of it), or a callable returning one given ``params``.
    params: the parameters.
    groups: the group names that are allowed.

  Returns:
    A tuple with the group name of every parameter leaf, in
    ``jax.tree.leaves(params)`` order.

  Raises:
    ValueError: if the labels do not fit the parameters' structure or name a
      group that is not in ``groups``.
  """
  label_tree = labels(params) if callable(labels) else labels
  try:
    per_leaf = jax.tree.broadcast(label_tree, params)
  except (ValueError, TypeError) as e:
    raise ValueError(structure_mismatch(label_tree, params)) from e
  names = tuple(jax.tree.leaves(per_leaf))
  if len(names) != len(jax.tree.leaves(params)):
    raise ValueError(structure_mismatch(label_tree, params))
  allowed = sorted(groups)
  for path, name in zip(leaf_paths(params), names):
    if name not in groups:
      raise ValueError(
          f"parameter {path!r} is labelled {name!r}, which is not a group; "
          f"expected one of {allowed}.")
  return names


def labels_like(per_leaf: tuple[str, ...]) -> Callable[[PyTree], PyTree]:
  """A labels function giving each leaf of a tree its resolved group name."""
  return lambda tree: jax.tree.unflatten(jax.tree.structure(tree), per_leaf)


def fast_by_path(
    fast: Union[str, re.Pattern[str], Callable[[str], bool]],
) -> Callable[[PyTree], PyTree]:
  """Labels parameters ``'fast'`` or ``'slow'`` by their '/'-joined path.

  Args:
    fast: a regular expression searched for in each leaf's path (for example
      ``'^head/'`` or ``'Dense_3'``), or a predicate on the path.

  Returns:
    A labels function for :func:`multirate_optax.multirate`.

  Example:
    >>> import jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> params = {'body': {'kernel': jnp.ones((2, 2))},
    ...           'head': {'kernel': jnp.ones((2, 1))}}
    >>> mo.fast_by_path('^head/')(params)
    {'body': {'kernel': 'slow'}, 'head': {'kernel': 'fast'}}
  """
  if callable(fast) and not isinstance(fast, re.Pattern):
    predicate = fast
  else:
    pattern = re.compile(fast)
    predicate = lambda path: pattern.search(path) is not None

  def labels(params: PyTree) -> PyTree:
    not_a_step_count(params, "the labels function of fast_by_path")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: FAST if predicate(path_str(path)) else SLOW, params)

  return labels


def groups_by_path(
    patterns: Mapping[str, Union[str, re.Pattern[str]]],
    default: Optional[str] = None,
) -> Callable[[PyTree], PyTree]:
  """Labels each parameter with the first group whose pattern its path matches.

  The groups of :func:`multirate_optax.multirate_groups` and
  :func:`multirate_optax.gradual_unfreezing`, by path, as
  :func:`fast_by_path` gives multirate's two.

  Args:
    patterns: ``{group: regular expression}``, searched in each leaf's
      '/'-joined path in the mapping's order; the first match wins.
    default: the group of parameters that match no pattern; ``None`` makes
      such a parameter an error that names it.

  Returns:
    A labels function.

  Example:
    >>> import jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> params = {'stem': {'w': jnp.ones(2)}, 'block': {'w': jnp.ones(2)},
    ...           'head': {'w': jnp.ones(1)}}
    >>> mo.groups_by_path({'head': '^head/', 'last': '^block/'},
    ...                   default='backbone')(params)
    {'block': {'w': 'last'}, 'head': {'w': 'head'}, 'stem': {'w': 'backbone'}}
  """
  compiled = [(group, re.compile(pattern)) for group, pattern in patterns.items()]

  def group_of(path: str) -> str:
    for group, pattern in compiled:
      if pattern.search(path) is not None:
        return group
    if default is None:
      raise ValueError(
          f"parameter {path!r} matches none of the patterns "
          f"{ {g: p.pattern for g, p in compiled} }; add a pattern for it or "
          "give groups_by_path a default group.")
    return default

  def labels(params: PyTree) -> PyTree:
    not_a_step_count(params, "the labels function of groups_by_path")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: group_of(path_str(path)), params)

  return labels


def fast_by_depth(n: int) -> Callable[[PyTree], PyTree]:
  """Labels the last ``n`` top-level modules ``'fast'`` and the rest ``'slow'``.

  "Last" follows the insertion order of the top-level mapping, which for Flax
  parameters is the order in which the modules were created (so ``Dense_10``
  comes after ``Dense_9``, unlike in ``jax.tree.leaves``' sorted order).
  JAX transformations (``jit``, ``tree.map``, ``optax.apply_updates``) return
  dicts with sorted keys, so call ``init`` with the parameters as the model's
  ``init`` (or a loader) returns them: the order seen on the first call for a
  set of module names is kept for that set.

  Args:
    n: how many top-level modules, counted from the end, are fast.

  Returns:
    A labels function for :func:`multirate_optax.multirate`.

  Example:
    >>> import jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> params = {'conv': {'kernel': jnp.ones(3)}, 'head': {'kernel': jnp.ones(2)}}
    >>> mo.fast_by_depth(1)(params)
    {'conv': {'kernel': 'slow'}, 'head': {'kernel': 'fast'}}
  """
  n = whole_number(n, "fast_by_depth's n")
  # The order is read once per set of module names: parameters that went
  # through a JAX transformation come back with sorted keys, and the labels
  # must not change when the optimizer checks them on those.
  fast_of: dict[frozenset[str], frozenset[str]] = {}

  def labels(params: PyTree) -> PyTree:
    not_a_step_count(params, "the labels function of fast_by_depth")
    if not isinstance(params, Mapping):
      raise TypeError(
          "fast_by_depth needs parameters whose top level is a mapping of "
          f"module names, got {type(params).__name__}.")
    names = list(params.keys())
    if n > len(names):
      raise ValueError(
          f"fast_by_depth({n}) asks for more fast modules than the {len(names)} "
          f"top-level modules {names}.")
    fast = fast_of.setdefault(frozenset(names), frozenset(names[-n:]))
    return {name: jax.tree.map(lambda _, g=(FAST if name in fast else SLOW): g,
                               params[name])
            for name in names}

  return labels
