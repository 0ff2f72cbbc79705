"""Hand-written multirate SGD with momentum (REFERENCE §1, per-step form).

Independent of the library: plain numpy on float32 leaves, one gradient of all
parameters per step from ``jax.grad``, of which the loop uses only what the
published algorithm uses.
"""

import jax
import numpy as np

from multirate_optax import path_str


def multirate_sgd(params, loss_fn, batches, *, h, momentum, period, drift,
                  is_fast, clip_norm=None, grad_fn=None):
  """Runs the published algorithm; returns the parameters after every step.

  if t % k == 0:  p_S = mu p_S + g_S;  p_F = mu p_F + g_F;  th_F -= (h/k) p_F
                  th_S -= h p_S (no drift)  or  th_S -= (h/k) p_S (drift)
  else:           p_F = mu p_F + g_F;  th_F -= (h/k) p_F
                  (drift: th_S -= (h/k) p_S with the held p_S)

  ``clip_norm`` clips the gradients that the step uses (fast ones on fast
  steps, all on slow steps) to that global norm first. ``grad_fn(params,
  batch)``, if given, replaces ``jax.grad(loss_fn)``: the gradients of all
  parameters, called once per step in order (a stateful one, an NNX model's
  whose rng streams and metrics advance, is used as it is).
  """
  if grad_fn is None:
    grad_fn = jax.jit(jax.grad(loss_fn))
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [path_str(p) for p, _ in flat]
  theta = {p: np.asarray(v, np.float32).copy() for p, (_, v) in zip(paths, flat)}
  mom = {p: np.zeros_like(v) for p, v in theta.items()}
  h = np.float32(h)
  h_fast = np.float32(h / period)
  mu = np.float32(momentum)
  history = []
  for t, batch in enumerate(batches):
    current = jax.tree.unflatten(treedef, [theta[p] for p in paths])
    grads = dict(zip(paths, (np.asarray(g) for g in
                             jax.tree.leaves(grad_fn(current, batch)))))
    slow_step = t % period == 0
    used = [p for p in paths if is_fast(p) or slow_step]
    if clip_norm is not None:
      norm = np.sqrt(sum(np.sum(np.square(grads[p])) for p in used))
      factor = np.float32(min(1.0, clip_norm / norm))
      grads = {p: g * factor for p, g in grads.items()}
    for p in used:
      mom[p] = mu * mom[p] + grads[p]
    for p in paths:
      if is_fast(p):
        theta[p] = theta[p] - h_fast * mom[p]
      elif drift:
        theta[p] = theta[p] - h_fast * mom[p]
      elif slow_step:
        theta[p] = theta[p] - h * mom[p]
    history.append(jax.tree.unflatten(treedef, [theta[p].copy() for p in paths]))
  return history
