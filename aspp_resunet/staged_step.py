"""The training step as one compiled program per model segment, for a bounded peak memory."""

import functools

import jax
import jax.numpy as jnp

from aspp_resunet import losses
from aspp_resunet import metrics

STEP_MODES = ('fused', 'staged')


class StagedTrainStep:
  """`(state, batch) -> (state, {'loss', 'counts'})`, the same step as `train_lib.train_step`.

  The forward pass runs segment by segment (`ResUNet3D.segments`, one residual block each),
  keeping only segment outputs; the backward pass recomputes each segment's forward inside its
  own vector-Jacobian program, last segment first. Each program is compiled on its own, so no
  compiler can merge the recomputation away (XLA:CPU ignores `jax.checkpoint` barriers): the
  peak is the segment outputs plus one segment's activations, at the cost of one more forward.
  """

  def __init__(self, model, loss_name, replicated):
    """`replicated`: the sharding of the returned state, loss and counts."""
    self._model = model
    self._segments = model.segments()
    self._loss_name = loss_name
    self._replicated = replicated
    count = len(self._segments)
    self._forward = [jax.jit(functools.partial(self._segment_forward, index))
                     for index in range(count)]
    # A segment's input is dead once its backward ran, and its gradient has the same shape:
    # donated, the gradient takes its buffer (segment 0's input is the caller's batch, kept).
    self._backward = [jax.jit(functools.partial(self._segment_backward, index),
                              donate_argnames=('inputs',) if index else ())
                      for index in range(count)]
    self._loss = jax.jit(self._loss_and_cotangent)
    self._update = jax.jit(_apply_gradients, donate_argnums=(0,), out_shardings=replicated)

  def _run(self, index, params, batch_stats, inputs, skip):
    outputs, updates = self._model.apply(
        {'params': params, 'batch_stats': batch_stats}, inputs, skip, True,
        mutable=['batch_stats'], method=lambda module, *args: module.run_segment(index, *args))
    return outputs, updates.get('batch_stats', {})

  def _segment_forward(self, index, params, batch_stats, inputs, skip):
    return self._run(index, params, batch_stats, inputs, skip)

  def _segment_backward(self, index, params, batch_stats, inputs, skip, cotangent,
                        extra_cotangent):
    if extra_cotangent is not None:  # the output is also used as a skip connection
      cotangent = cotangent + extra_cotangent
    if index == 0:  # no gradient for the input image
      _, vjp = jax.vjp(lambda p, s: self._run(index, p, batch_stats, inputs, s)[0], params, skip)
      param_grads, skip_grad = vjp(cotangent)
      return param_grads, None, skip_grad
    _, vjp = jax.vjp(lambda p, x, s: self._run(index, p, batch_stats, x, s)[0],
                     params, inputs, skip)
    return vjp(cotangent)

  def _loss_and_cotangent(self, logits, batch):
    loss, cotangent = jax.value_and_grad(
        lambda z: losses.compute_loss(self._loss_name, z, batch['label'], batch['mask']))(logits)
    counts = metrics.region_counts(jnp.argmax(logits, axis=-1), batch['label'])
    return (jax.lax.with_sharding_constraint(loss, self._replicated), cotangent,
            jax.lax.with_sharding_constraint(counts, self._replicated))

  def __call__(self, state, batch):
    subtrees = [({k: state.params[k] for k in segment.names if k in state.params},
                 {k: state.batch_stats[k] for k in segment.names if k in state.batch_stats})
                for segment in self._segments]
    outputs, new_batch_stats = [], {}
    x = batch['image']
    for index, segment in enumerate(self._segments):
      skip = None if segment.skip_from is None else outputs[segment.skip_from]
      x, updates = self._forward[index](*subtrees[index], x, skip)
      new_batch_stats.update(updates)
      outputs.append(x)
    del x
    loss, cotangent, counts = self._loss(outputs[-1], batch)
    grads, skip_cotangents = {}, {}
    for index in reversed(range(len(self._segments))):
      segment = self._segments[index]
      inputs = outputs[index - 1] if index else batch['image']
      outputs[index] = None  # every consumer of this output has had its backward pass
      if index:
        outputs[index - 1] = None  # donated: this segment is its last consumer in reverse
      skip = None if segment.skip_from is None else outputs[segment.skip_from]
      param_grads, cotangent, skip_cotangent = self._backward[index](
          *subtrees[index], inputs=inputs, skip=skip, cotangent=cotangent,
          extra_cotangent=skip_cotangents.pop(index, None))
      del inputs
      grads.update(param_grads)
      if skip_cotangent is not None:
        skip_cotangents[segment.skip_from] = skip_cotangent
    state = self._update(state, grads, new_batch_stats)
    return state, {'loss': loss, 'counts': counts}


def _apply_gradients(state, grads, batch_stats):
  return state.apply_gradients(grads=grads, batch_stats=batch_stats or state.batch_stats)
