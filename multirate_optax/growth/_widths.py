"""Width growth of a network, function-preserving, with variance transfer.

A network is described as a stack of :class:`Layer` s, each naming the width it
reads and the width it writes; layers that write (or read) the same width
grow together, so a residual stream is simply a width written by several
layers. :func:`grow` adds units to widths (Yuan, Savarese & Maire, NeurIPS
2023):

* **Neuron pairing.** New units come in pairs. Both members of a pair get the
  same fan-in weights ``V`` (every layer that writes the width draws its own
  ``V``; a residual stream, written by several layers, thus sums equal terms
  for both members), so they always carry the same activation; the layers that read the
  width get ``Z`` from the first member and ``-Z`` from the second, so the pair
  cancels and the network computes exactly the same function after growth. An
  odd unit left over reads out through zeros. New biases, BatchNorm offsets and
  means are 0, scales and variances 1, for both members alike.
* **Variance transfer.** New weights are drawn with variance ``1 / fan_in`` of
  the grown layer, as a fresh network of the new width would be. A layer whose
  fan-in grows from ``C`` to ``C'`` has its old weights (and bias) multiplied by
  ``c = sqrt(C / C')``, which gives them that same variance, ``c**2 / C = 1 /
  C'``. This keeps the function only where a BatchNorm normalises the layer's
  output: its running mean is multiplied by ``c`` and its running variance
  becomes ``c**2 (var + eps) - eps``, so ``(c x - c mean) / sqrt(c**2 (var +
  eps))`` equals the old output exactly (and batch statistics scale with ``c``
  by themselves). A layer with no normaliser after it (the classifier, the
  layers of a BatchNorm-free MLP) keeps its old weights: any factor would
  change the function, since nothing downstream divides it out.

New units are appended after the old ones on every axis, so the old units keep
their indices; :class:`Growth` records the stage that added each unit, from
which :func:`element_stages` gives the stage of every weight element.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import numpy as np

from multirate_optax.core._checks import whole_number
from multirate_optax.core._groups import leaf_paths

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Layer:
  """A Dense or Conv layer of a growing network.

  Attributes:
    kernel: the '/'-joined path of its kernel in the params, e.g.
      ``'block0/conv1/kernel'``. Flax layouts: Dense ``(in, out)``, Conv
      ``(..., in, out)``: the second-to-last axis reads, the last one writes.
    reads: the name of the width its inputs have (e.g. ``'input'``,
      ``'stream'``).
    writes: the name of the width its outputs have.
    bias: the path of its bias, if it has one.
    norm: the path of the BatchNorm that normalises its output, if any: its
      ``scale`` and ``bias`` under that path in the params, its ``mean`` and
      ``var`` under that path in the batch statistics.

  Example:
    A two-layer MLP: the hidden layer reads the input's width and writes the
    hidden one, which the output layer reads.

    >>> import jax, jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> layers = [mo.Layer('hidden/kernel', reads='input', writes='hidden',
    ...                    bias='hidden/bias'),
    ...           mo.Layer('out/kernel', reads='hidden', writes='output')]
    >>> params = {'hidden': {'kernel': jnp.full((2, 3), 0.5), 'bias': jnp.zeros(3)},
    ...           'out': {'kernel': jnp.ones((3, 1))}}
    >>> mo.describe_widths(layers, params).widths
    {'input': 2, 'hidden': 3, 'output': 1}
  """

  kernel: str
  reads: str
  writes: str
  bias: Optional[str] = None
  norm: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Growth:
  """Which growth stage added each unit of each width.

  Attributes:
    unit_stages: ``{width: stages}``, an int array with the stage (0 for the
      network before any growth) of every unit of the width.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> layers = [mo.Layer('hidden/kernel', reads='input', writes='hidden',
    ...                    bias='hidden/bias'),
    ...           mo.Layer('out/kernel', reads='hidden', writes='output')]
    >>> params = {'hidden': {'kernel': jnp.full((2, 3), 0.5), 'bias': jnp.zeros(3)},
    ...           'out': {'kernel': jnp.ones((3, 1))}}
    >>> growth = mo.describe_widths(layers, params)
    >>> growth.stage
    0
    >>> _, _, growth, _ = mo.grow(params, {}, layers, growth, {'hidden': 5},
    ...                           key=jax.random.key(0))
    >>> growth.widths, growth.stage
    ({'input': 2, 'hidden': 5, 'output': 1}, 1)
    >>> growth.unit_stages['hidden'].tolist()
    [0, 0, 0, 1, 1]
  """

  unit_stages: Mapping[str, np.ndarray]

  @property
  def widths(self) -> dict[str, int]:
    """The current size of every width."""
    return {name: len(s) for name, s in self.unit_stages.items()}

  @property
  def stage(self) -> int:
    """The last stage that added units."""
    return max((int(s.max()) for s in self.unit_stages.values() if len(s)),
               default=0)


def describe_widths(layers: Sequence[Layer], params: PyTree) -> Growth:
  """The :class:`Growth` of a network that has not grown yet (all stage 0).

  Raises:
    ValueError: if the description does not fit ``params``: a path that is
      not there, or layers that disagree on the size of a width.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> layers = [mo.Layer('hidden/kernel', reads='input', writes='hidden',
    ...                    bias='hidden/bias'),
    ...           mo.Layer('out/kernel', reads='hidden', writes='output')]
    >>> params = {'hidden': {'kernel': jnp.full((2, 3), 0.5), 'bias': jnp.zeros(3)},
    ...           'out': {'kernel': jnp.ones((3, 1))}}
    >>> growth = mo.describe_widths(layers, params)
    >>> growth.widths, growth.unit_stages['hidden'].tolist()
    ({'input': 2, 'hidden': 3, 'output': 1}, [0, 0, 0])
  """
  return Growth({name: np.zeros(size, np.int32)
                 for name, size in _width_sizes(layers, params).items()})


def grow(
    params: PyTree,
    batch_stats: PyTree,
    layers: Sequence[Layer],
    growth: Growth,
    widths: Mapping[str, int],
    *,
    key: jax.Array,
    variance_transfer: bool = True,
    noise: float = 0.0,
    epsilon: float = 1e-5,
) -> tuple[PyTree, PyTree, Growth, PyTree]:
  """Grows the named widths of a network, keeping its function.

  Args:
    params: the network's parameters (nested dicts, as Flax Linen gives them).
    batch_stats: its BatchNorm statistics (``{}`` if none).
    layers: the description of the stack.
    growth: the current :class:`Growth` (from :func:`describe_widths`, or
      from the previous call).
    widths: ``{width: new size}`` for the widths to grow; sizes not smaller
      than the current ones.
    key: PRNG key of the new weights.
    variance_transfer: rescale the old weights of layers whose fan-in grows
      and whose output is normalised (see the module docstring).
    noise: standard deviation, relative to the new weights', of noise added to
      the second member of each pair's fan-in weights, to break the pairs'
      symmetry; 0 keeps the function exactly.
    epsilon: the BatchNorm epsilon, for the exact variance transfer.

  Returns:
    ``(params, batch_stats, growth, factors)``: the grown trees, the new
    :class:`Growth` (new units belong to stage ``growth.stage + 1``), and
    ``factors``, a tree like ``params`` of the factor each leaf's old entries
    were multiplied by (for :func:`~multirate_optax.grow_optimizer_state`).

  Example:
    The hidden width grows from 3 to 5 units (one pair); the network computes
    the same function, the pair's read-out weights cancelling:

    >>> import jax, jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> layers = [mo.Layer('hidden/kernel', reads='input', writes='hidden',
    ...                    bias='hidden/bias'),
    ...           mo.Layer('out/kernel', reads='hidden', writes='output')]
    >>> params = {'hidden': {'kernel': jnp.full((2, 3), 0.5), 'bias': jnp.zeros(3)},
    ...           'out': {'kernel': jnp.ones((3, 1))}}
    >>> def apply(p, x):
    ...   h = jnp.tanh(x @ p['hidden']['kernel'] + p['hidden']['bias'])
    ...   return h @ p['out']['kernel']
    >>> grown, _, growth, factors = mo.grow(
    ...     params, {}, layers, mo.describe_widths(layers, params), {'hidden': 5},
    ...     key=jax.random.key(0))
    >>> jax.tree.map(jnp.shape, grown)
    {'hidden': {'bias': (5,), 'kernel': (2, 5)}, 'out': {'kernel': (5, 1)}}
    >>> x = jnp.array([[1.0, -2.0]])
    >>> bool(jnp.allclose(apply(grown, x), apply(params, x)))
    True
    >>> float(grown['out']['kernel'][3, 0] + grown['out']['kernel'][4, 0])
    0.0
    >>> factors['out']['kernel']  # no BatchNorm: old weights kept as they are
    1.0
  """
  sizes = _width_sizes(layers, params)
  if growth.widths != sizes:
    raise ValueError(
        f"the growth record has widths {growth.widths} but the params have "
        f"{sizes}: pass the Growth that the last grow (or describe_widths) "
        "returned for these params.")
  for name, size in widths.items():
    if name not in sizes:
      raise ValueError(
          f"width {name!r} is not in the description; its widths are "
          f"{sorted(sizes)}.")
    size = whole_number(size, f"the new size of width {name!r}")
    if size < sizes[name]:
      raise ValueError(
          f"width {name!r} cannot shrink from {sizes[name]} to {size}.")
  # Host-side numpy: a growth is a few dozen small array edits, which as
  # eager JAX ops would each compile for every new shape.
  flat_params = {p: np.asarray(v) for p, v in _flat(params).items()}
  flat_stats = {p: np.asarray(v) for p, v in _flat(batch_stats).items()}
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  factors = {path: 1.0 for path in flat_params}
  stage = growth.stage + 1
  unit_stages = dict(growth.unit_stages)
  final = {**sizes, **{name: int(size) for name, size in widths.items()}}
  growing = [name for name in sorted(widths) if final[name] > sizes[name]]
  if variance_transfer:  # on the old entries only, before any unit is added
    for name in growing:
      _transfer_variance(flat_params, flat_stats, factors, layers, name,
                         math.sqrt(sizes[name] / final[name]), epsilon)
  for name in growing:
    _add_units(flat_params, flat_stats, layers, name, sizes[name], final,
               rng, noise)
    unit_stages[name] = np.concatenate(
        [unit_stages[name], np.full(final[name] - sizes[name], stage, np.int32)])
  to_device = lambda flat: {p: jax.numpy.asarray(v) for p, v in flat.items()}
  return (_nested(to_device(flat_params), params),
          _nested(to_device(flat_stats), batch_stats),
          Growth(unit_stages), _nested(factors, params))


def element_stages(params: PyTree, layers: Sequence[Layer],
                   growth: Growth) -> PyTree:
  """The growth stage of every parameter element.

  A kernel element belongs to the later of the stages of the unit it reads
  and the unit it writes; a bias or BatchNorm element to its unit's stage;
  parameters outside the description to stage 0.

  Returns:
    A tree like ``params`` of int32 numpy arrays of the same shapes.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import multirate_optax as mo
    >>> layers = [mo.Layer('hidden/kernel', reads='input', writes='hidden',
    ...                    bias='hidden/bias'),
    ...           mo.Layer('out/kernel', reads='hidden', writes='output')]
    >>> params = {'hidden': {'kernel': jnp.full((2, 3), 0.5), 'bias': jnp.zeros(3)},
    ...           'out': {'kernel': jnp.ones((3, 1))}}
    >>> grown, _, growth, _ = mo.grow(
    ...     params, {}, layers, mo.describe_widths(layers, params), {'hidden': 5},
    ...     key=jax.random.key(0))
    >>> stages = mo.element_stages(grown, layers, growth)
    >>> stages['hidden']['kernel'].tolist(), stages['out']['kernel'].ravel().tolist()
    ([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]], [0, 0, 0, 1, 1])
  """
  flat = _flat(params)
  stages = {path: np.zeros(np.shape(value), np.int32)
            for path, value in flat.items()}
  for layer in layers:
    read = growth.unit_stages[layer.reads]
    write = growth.unit_stages[layer.writes]
    shape = np.shape(flat[layer.kernel])
    stages[layer.kernel] = np.broadcast_to(
        np.maximum(read[:, None], write[None, :]), shape).copy()
    for path in _written(layer, flat, {}):
      if path != layer.kernel and path in stages:
        stages[path] = write.copy()
  return _nested(stages, params)


def _flat(tree: PyTree) -> dict[str, Any]:
  return dict(zip(leaf_paths(tree), jax.tree.leaves(tree)))


def _nested(flat: Mapping[str, Any], like: PyTree) -> PyTree:
  return jax.tree.unflatten(jax.tree.structure(like),
                            [flat[p] for p in leaf_paths(like)])


def _norm_paths(layer: Layer, stats: Mapping[str, Any]) -> tuple[list, list]:
  """The params and the statistics of the layer's BatchNorm that exist."""
  if layer.norm is None:
    return [], []
  return ([f"{layer.norm}/scale", f"{layer.norm}/bias"],
          [p for p in (f"{layer.norm}/mean", f"{layer.norm}/var")
           if p in stats])


def _written(layer: Layer, flat: Mapping[str, Any],
             stats: Mapping[str, Any]) -> list[str]:
  """The params indexed by the units the layer writes (last axis)."""
  norm_params, _ = _norm_paths(layer, stats)
  return [p for p in [layer.kernel, layer.bias, *norm_params]
          if p is not None and p in flat]


def _width_sizes(layers: Sequence[Layer], params: PyTree) -> dict[str, int]:
  """The size of every width, checked across the layers that use it."""
  if not layers:
    raise ValueError("the description of the stack has no layer.")
  flat = _flat(params)
  sizes: dict[str, tuple[int, str]] = {}

  def record(width: str, size: int, where: str) -> None:
    if width in sizes and sizes[width][0] != size:
      raise ValueError(
          f"width {width!r} has size {sizes[width][0]} at {sizes[width][1]} "
          f"but {size} at {where}: the description does not fit the params.")
    sizes.setdefault(width, (size, where))

  for layer in layers:
    paths = [layer.kernel, layer.bias] + (
        [f"{layer.norm}/scale", f"{layer.norm}/bias"] if layer.norm else [])
    for path in paths:
      if path is not None and path not in flat:
        raise ValueError(
            f"layer of kernel {layer.kernel!r} names {path!r}, which is not "
            f"in the params; their paths: {sorted(flat)[:10]}"
            + (" ..." if len(flat) > 10 else "") + ".")
    kernel = flat[layer.kernel]
    if np.ndim(kernel) < 2:
      raise ValueError(
          f"kernel {layer.kernel!r} has shape {np.shape(kernel)}; a Dense or "
          "Conv kernel has at least 2 axes (..., in, out).")
    record(layer.reads, np.shape(kernel)[-2], f"{layer.kernel!r} (axis -2)")
    record(layer.writes, np.shape(kernel)[-1], f"{layer.kernel!r} (axis -1)")
    for path in paths[1:]:
      if path is not None:
        if np.ndim(flat[path]) != 1:
          raise ValueError(
              f"{path!r} has shape {np.shape(flat[path])}; expected one entry "
              f"per unit of width {layer.writes!r}.")
        record(layer.writes, np.shape(flat[path])[0], repr(path))
  return {name: size for name, (size, _) in sizes.items()}


def _transfer_variance(flat, stats, factors, layers, width, c, epsilon):
  """Rescales the layers reading ``width`` whose output is normalised."""
  for layer in layers:
    if layer.reads != width or layer.norm is None:
      continue
    _, stat_paths = _norm_paths(layer, stats)
    for path in (layer.kernel, layer.bias):
      if path is not None:
        flat[path] = (flat[path] * c).astype(flat[path].dtype)
        factors[path] *= c
    mean, var = f"{layer.norm}/mean", f"{layer.norm}/var"
    if mean in stat_paths:
      stats[mean] = (stats[mean] * c).astype(stats[mean].dtype)
    if var in stat_paths:
      # var + eps is what BatchNorm divides by, and c**2 (var + eps) >= 0; the
      # stored variance itself may dip below 0 for a channel with var < eps.
      stats[var] = (c * c * (stats[var] + epsilon) - epsilon).astype(
          stats[var].dtype)


def _add_units(flat, stats, layers, width, old, final, rng, noise):
  """Appends paired units to ``width``, up to its size in ``final``.

  New weights have variance ``1 / fan_in`` of the layer once every width has
  its ``final`` size, whatever the order in which the widths grow.
  """
  new = final[width]
  added = new - old
  pairs = added // 2
  for layer in layers:
    if layer.writes == width:
      kernel = flat[layer.kernel]
      scale = 1 / math.sqrt(np.prod(kernel.shape[:-2]) * final[layer.reads])
      v = rng.normal(size=kernel.shape[:-1] + (pairs,)) * scale
      second = v + noise * scale * rng.normal(size=v.shape) if noise else v
      parts = [kernel, v, second]
      if added % 2:
        parts.append(rng.normal(size=kernel.shape[:-1] + (1,)) * scale)
      flat[layer.kernel] = np.concatenate(parts, axis=-1).astype(kernel.dtype)
      norm_params, stat_paths = _norm_paths(layer, stats)
      fills = {layer.bias: 0.0}
      fills.update({p: (1.0 if p.endswith("/scale") else 0.0)
                    for p in norm_params})
      for path, value in fills.items():
        if path is not None:
          flat[path] = _append(flat[path], added, value)
      for path in stat_paths:
        stats[path] = _append(stats[path], added,
                              1.0 if path.endswith("/var") else 0.0)
    if layer.reads == width:
      kernel = flat[layer.kernel]
      shape = list(kernel.shape)
      shape[-2] = pairs
      z = rng.normal(size=shape) / math.sqrt(np.prod(shape[:-2]) * new)
      parts = [kernel, z, -z]
      if added % 2:
        shape[-2] = 1
        parts.append(np.zeros(shape))
      flat[layer.kernel] = np.concatenate(parts, axis=-2).astype(kernel.dtype)


def _append(array: np.ndarray, count: int, value: float) -> np.ndarray:
  return np.concatenate([array, np.full((count,), value, array.dtype)])
