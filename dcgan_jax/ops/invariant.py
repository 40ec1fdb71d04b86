"""Batch reductions whose result has the same bits on any number of devices and processes.

Why: a float32 sum depends on the order of its terms. With plain `lax.pmean`, one device sums a
gradient over its 128 examples in one XLA reduction, four devices over 32 each and then across devices:
the same math, other roundings (~1e-7 relative). GAN training with Adam amplifies such differences about
1.5x per step (Adam turns the sign of a near-zero gradient into a full learning-rate step), so after 20
steps two topologies differ by ~1e-3 relative over all parameters: not noise a reproducibility study can
ignore.

How (opt in with `--invariant_groups=G`): the global batch is cut into G fixed *groups* of m = B / G
consecutive examples; a device holding L = G / devices groups computes everything group by group, at the
same shapes (m examples) on every topology, so every per-example result has the same bits. Every sum over
the batch is first a per-group partial sum (same shapes again), then the G partials of all devices are
gathered (`lax.all_gather`, in global group order) and added left to right in one fixed order. Sums over
the batch occur in exactly three places, and each is written here:
  * the weight gradients of per-example layers (Dense, Conv, ConvTranspose): `grouped_layer`, whose
    backward pass returns the gradient of the *global* loss, already summed over all devices;
  * BatchNorm's statistics and its backward pass: `batch_norm`;
  * the loss itself: per-device loss = sum over its examples / global batch size (train.py), so every
    example's loss cotangent is the same number on every topology.
The step then uses those gradients as they are (no `lax.pmean`, which would add in another order).

Cost: L smaller matrix products instead of one, and the step's program holds L copies of each layer
(compile time grows with L). Per-example computations are only bitwise stable at fixed shapes: XLA picks
its tiling by batch size (measured: the mnist generator's outputs for 8 examples differ in the last bit
between a batch of 8 and a batch of 32), which is why the groups exist at all.
"""

import dataclasses
from typing import Callable, List, Optional

import jax
from jax import lax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Reductions:
  """How the step turns per-example values into batch means (losses.py's `mean` argument).

  share: per-example values -> the loss whose gradient the step takes (this device's part);
  mean: per-example values -> the global batch mean, for metrics;
  average: this device's gradients -> the global batch's;
  exact: whether the metrics are already global (else the step pmeans them)."""
  share: Callable
  mean: Callable
  average: Callable
  exact: bool


def reductions(batch_size: int, invariant_groups: int, axis_name: str) -> Reductions:
  """--invariant_groups=G > 0: the layers return gradients already summed over all devices in a fixed
  order, of a loss that is each device's share of the global mean (sum / global batch size), and the
  metrics are summed in a fixed order too. G = 0: the usual per-device means and lax.pmean."""
  if invariant_groups:
    group_size = batch_size // invariant_groups
    return Reductions(share=lambda v: jnp.sum(v) / batch_size,
                      mean=lambda v: global_mean(v, group_size, axis_name),
                      average=lambda grads: grads, exact=True)
  return Reductions(share=jnp.mean, mean=jnp.mean, average=lambda grads: lax.pmean(grads, axis_name),
                    exact=False)


def split(x: jax.Array, group_size: int) -> List[jax.Array]:
  """(L * m, ...) -> L arrays (m, ...): this device's groups, in order."""
  if x.shape[0] % group_size:
    raise ValueError(f"batch of {x.shape[0]} is not a multiple of the group size {group_size}")
  return [x[i:i + group_size] for i in range(0, x.shape[0], group_size)]


def ordered_sum(partials: List[jax.Array], axis_name: Optional[str]) -> jax.Array:
  """Sum of every device's per-group partial sums, added in global group order, on every device.

  partials: this device's L partial sums (equal shapes), in group order. Under pmap over `axis_name`
  device d holds groups [d * L, (d + 1) * L); outside pmap (axis_name None) this device holds them all.
  Returns their total over all G groups, ((p_0 + p_1) + p_2) + ..., identical bits on any topology.
  """
  stacked = jnp.stack(partials)  # (L, ...)
  if axis_name is not None:
    stacked = lax.all_gather(stacked, axis_name, tiled=True)  # (G, ...), global group order
  total = stacked[0]
  for i in range(1, stacked.shape[0]):  # explicit left fold: XLA never reassociates float adds
    total = total + stacked[i]
  return total


def global_mean(x: jax.Array, group_size: int, axis_name: Optional[str]) -> jax.Array:
  """Mean of x (local batch, ...) over all elements of the global batch, with an invariant sum. For
  metrics: no gradient flows through it (all_gather's transpose would sum in another order)."""
  x = lax.stop_gradient(x)
  groups = split(x, group_size)
  total = ordered_sum([jnp.sum(g) for g in groups], axis_name)
  return total / (groups[0].size * num_groups(len(groups), axis_name))


def grouped_layer(f: Callable, params, x: jax.Array, group_size: int, axis_name: Optional[str]):
  """f(params, x) for a per-example layer f (no coupling between examples), group by group.

  Forward: concat_i f(params, x_i) over this device's groups x_i (m examples each).
  Backward: the input cotangent group by group; the parameter gradient is the `ordered_sum` over all
  groups of all devices, i.e. the gradient of the *global* loss, the same on every device. (The
  cotangent arriving here must be the global loss's, which it is when the loss is a sum over examples:
  see the module docstring.)
  """

  @jax.custom_vjp
  def apply(params, x):
    return jnp.concatenate([f(params, xg) for xg in split(x, group_size)])

  def fwd(params, x):
    outs, vjps = zip(*(jax.vjp(f, params, xg) for xg in split(x, group_size)))
    return jnp.concatenate(outs), list(vjps)  # vjp functions are pytrees: kept as residuals

  def bwd(vjps, dy):
    grads, dxs = zip(*(vjp(dyg) for vjp, dyg in zip(vjps, split(dy, group_size))))
    dparams = jax.tree.map(lambda *g: ordered_sum(list(g), axis_name), *grads)
    return dparams, jnp.concatenate(dxs)

  apply.defvjp(fwd, bwd)
  return apply(params, x)


def batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, group_size: int,
               axis_name: Optional[str]):
  """Training-mode BatchNorm over the global batch, with invariant sums in both passes.

  x: (local batch, ..., C) in any float dtype; scale, bias: float32 (C,). Statistics are computed in
  float32 over every axis but the last: the mean first, then the mean squared deviation (two passes, so
  no E[x^2] - E[x]^2 cancellation). Returns (y in x.dtype, mean, var), mean and var float32 (C,), the
  batch statistics for the running averages (no gradient flows through them).
  """
  axes = tuple(range(x.ndim - 1))
  n = float(x[:group_size].size // x.shape[-1] * num_groups(x.shape[0] // group_size, axis_name))

  @jax.custom_vjp
  def normalize(x, scale, bias):
    return fwd(x, scale, bias)[0]

  def fwd(x, scale, bias):
    groups = split(x.astype(jnp.float32), group_size)
    mean = ordered_sum([jnp.sum(g, axes) for g in groups], axis_name) / n
    var = ordered_sum([jnp.sum(jnp.square(g - mean), axes) for g in groups], axis_name) / n
    inv = lax.rsqrt(var + epsilon)
    y = ((x.astype(jnp.float32) - mean) * (inv * scale) + bias).astype(x.dtype)
    return (y, mean, var), (x, mean, inv, scale)

  def bwd(res, cotangents):
    x, mean, inv, scale = res
    dy = cotangents[0]  # mean and var only feed the running averages: their cotangents are zero
    xhat = [(g - mean) * inv for g in split(x.astype(jnp.float32), group_size)]
    dys = split(dy.astype(jnp.float32), group_size)
    dbias = ordered_sum([jnp.sum(d, axes) for d in dys], axis_name)
    dscale = ordered_sum([jnp.sum(d * h, axes) for d, h in zip(dys, xhat)], axis_name)
    # x also moves the batch mean and variance, for every example: hence the two global terms.
    dx = [(scale * inv) * (d - dbias / n - h * (dscale / n)) for d, h in zip(dys, xhat)]
    return jnp.concatenate(dx).astype(x.dtype), dscale, dbias

  normalize.defvjp(fwd, bwd)
  y, mean, var = normalize(x, scale, bias)
  return y, lax.stop_gradient(mean), lax.stop_gradient(var)


def num_groups(local_groups: int, axis_name: Optional[str]) -> int:
  """G, the number of groups over all devices (static)."""
  return local_groups * (lax.axis_size(axis_name) if axis_name is not None else 1)
