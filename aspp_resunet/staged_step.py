"""The training step as one compiled program per model segment, for a bounded peak memory."""

import functools
import os

import jax
import jax.numpy as jnp

from aspp_resunet import losses
from aspp_resunet import metrics
from aspp_resunet import xla_options

STEP_MODES = ('auto', 'fused', 'staged')
# 'auto' on CPU stages the step when the fused program would need more than this share of the
# memory available when training starts (the rest: input pipeline, evaluation, other programs).
FUSED_MEMORY_FRACTION = 0.75


def program_bytes(compiled):
  """Memory one device needs to run a compiled program (XLA's buffer assignment)."""
  memory = compiled.memory_analysis()
  return sum(getattr(memory, f'{kind}_size_in_bytes', 0) or 0
             for kind in ('temp', 'argument', 'output')) - (memory.alias_size_in_bytes or 0)


def available_memory_bytes():
  """MemAvailable of /proc/meminfo (physical memory where that file does not exist)."""
  try:
    with open('/proc/meminfo') as stream:
      for line in stream:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


class StagedTrainStep:
  """`(state, batch) -> (state, {'loss', 'counts'})`, the same step as `train_lib.train_step`.

  The forward pass runs segment by segment (`ResUNet3D.segments`: each residual block in two
  halves), keeping only block outputs; the backward pass recomputes each segment's forward
  inside its own vector-Jacobian program, last segment first. Each program is compiled on its
  own, so no compiler can merge the recomputation away (XLA:CPU ignores `jax.checkpoint`
  barriers): the peak is the kept outputs plus one segment's activations, at the cost of one
  more forward pass (two for the blocks' first halves, whose outputs are not kept).
  """

  def __init__(self, model, loss_name, replicated):
    """`replicated`: the sharding of the returned state, loss and counts."""
    self._model = model
    self._segments = model.segments()
    self._loss_name = loss_name
    self._replicated = replicated
    # Value v (0: the image, i + 1: segment i's output) is read by these segments.
    self._readers = {}
    for index, segment in enumerate(self._segments):
      for value in segment.inputs:
        self._readers.setdefault(value, []).append(index)
    # A block's hidden map (read only by the block's second half) is not kept: the backward
    # pass recomputes it from the block's inputs, which are kept.
    self._recomputed = {value for value, readers in self._readers.items()
                        if readers == [value] and self._segments[value - 1].part == 'first'}
    # Every program of the step compiled with the model's XLA options.
    jit = functools.partial(jax.jit, compiler_options=xla_options.options(model.dtype))
    self._forward = [jit(functools.partial(self._run, segment)) for segment in self._segments]
    self._backward = []
    for index, segment in enumerate(self._segments):
      # The partial input gradients (argument 3) are summed into the returned ones, in place.
      # An input read by this segment only is dead after it; donated, its gradient (same
      # shape) takes its buffer. (An input read by several has a partial gradient to take
      # that output buffer; the image, value 0, is the caller's.)
      donate = (3,) + tuple(4 + k for k, value in enumerate(segment.inputs)
                            if value and self._readers[value] == [index])
      self._backward.append(jit(functools.partial(self._segment_backward, index),
                                donate_argnums=donate))
    self._loss = jit(self._loss_and_cotangent)
    self._update = jit(_apply_gradients, donate_argnums=(0,), out_shardings=replicated)

  def _run(self, segment, params, batch_stats, *inputs):
    """(output, updated batch statistics) of one segment in training mode."""
    outputs, updates = self._model.apply(
        {'params': params, 'batch_stats': batch_stats}, *inputs, mutable=['batch_stats'],
        method=lambda module, *args: module.run_segment(segment, *args, train=True))
    return outputs, updates.get('batch_stats', {})

  def _segment_backward(self, index, params, batch_stats, cotangent, partial_grads, *inputs):
    """(parameter gradients, input gradients + `partial_grads`: other readers' share)."""
    segment = self._segments[index]
    differentiable = [k for k, value in enumerate(segment.inputs) if value]

    def run(params, *wrt):
      args = list(inputs)
      for k, arg in zip(differentiable, wrt):
        args[k] = arg
      return self._run(segment, params, batch_stats, *args)[0]

    _, vjp = jax.vjp(run, params, *(inputs[k] for k in differentiable))
    param_grads, *input_grads = vjp(cotangent)
    grads = [None] * len(inputs)  # none for the image
    for k, grad in zip(differentiable, input_grads):
      grads[k] = grad if partial_grads[k] is None else grad + partial_grads[k]
    return param_grads, grads

  def _loss_and_cotangent(self, logits, batch):
    loss, cotangent = jax.value_and_grad(
        lambda z: losses.compute_loss(self._loss_name, z, batch['label'], batch['mask']))(logits)
    counts = metrics.region_counts(jnp.argmax(logits, axis=-1), batch['label'])
    return (jax.lax.with_sharding_constraint(loss, self._replicated), cotangent,
            jax.lax.with_sharding_constraint(counts, self._replicated))

  def __call__(self, state, batch):
    if self._replicated is not None:
      # Where the update puts it: a state placed elsewhere (e.g. fresh from initialisation)
      # would have every program compiled twice, for it and for the first update's output.
      state = jax.device_put(state, self._replicated)
    subtrees = [(select_paths(state.params, segment.paths),
                 select_paths(state.batch_stats, segment.paths)) for segment in self._segments]

    def forward(index, values):
      return self._forward[index](*subtrees[index],
                                  *(values[v] for v in self._segments[index].inputs))

    values, new_batch_stats = [batch['image']], {}
    for index, segment in enumerate(self._segments):
      output, updates = forward(index, values)
      merge_paths(new_batch_stats, updates)
      values.append(output)
      for value in segment.inputs:
        if value in self._recomputed:
          values[value] = None
    loss, cotangent, counts = self._loss(values[-1], batch)
    # One running sum per value: each reader's backward adds its share to it, in place.
    grads, cotangents = {}, {len(self._segments): cotangent}
    del cotangent, output
    for index in reversed(range(len(self._segments))):
      segment = self._segments[index]
      for value in segment.inputs:
        if values[value] is None:  # a hidden map: its first half reads only kept values
          values[value] = forward(value - 1, values)[0]
      inputs = [values[v] for v in segment.inputs]
      values[index + 1] = None  # every reader of this output has had its backward pass
      for value in segment.inputs:
        if value and min(self._readers[value]) == index:
          values[value] = None  # donated: this segment is its last reader backwards
      partial_grads = tuple(cotangents.pop(value, None) if value else None
                            for value in segment.inputs)
      param_grads, input_grads = self._backward[index](
          *subtrees[index], cotangents.pop(index + 1), partial_grads, *inputs)
      del inputs, partial_grads
      merge_paths(grads, param_grads)
      for value, grad in zip(segment.inputs, input_grads):
        if value:
          cotangents[value] = grad
    state = self._update(state, grads, new_batch_stats)
    return state, {'loss': loss, 'counts': counts}


def select_paths(tree, paths):
  """The nested-dict subtree of `tree` holding the given key paths (absent paths skipped)."""
  selected = {}
  for path in paths:
    node = tree
    for key in path:
      if not isinstance(node, dict) or key not in node:
        break
      node = node[key]
    else:
      target = selected
      for key in path[:-1]:
        target = target.setdefault(key, {})
      target[path[-1]] = node
  return selected


def merge_paths(into, tree):
  """Adds the leaves of nested dict `tree` to nested dict `into` (key paths are disjoint)."""
  for key, node in tree.items():
    if isinstance(node, dict) and isinstance(into.get(key), dict):
      merge_paths(into[key], node)
    else:
      into[key] = node


def _apply_gradients(state, grads, batch_stats):
  return state.apply_gradients(grads=grads, batch_stats=batch_stats or state.batch_stats)
