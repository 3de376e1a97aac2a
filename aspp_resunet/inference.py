"""Prediction of class probabilities: whole volume, Gaussian-weighted sliding window, mirror TTA."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

MODES = ('whole', 'sliding_window')


def mirror_axes_sets(enabled):
  """The flip combinations averaged by mirroring TTA (all 8 subsets of the 3 spatial axes)."""
  if not enabled:
    return [()]
  return [tuple(axis for axis, flip in zip((1, 2, 3), flips) if flip)
          for flips in itertools.product((False, True), repeat=3)]


def whole_volume_probabilities(logits_fn, images, mirror=False):
  """Softmax probabilities of `logits_fn` on (B, X, Y, Z, C) images, averaged over mirrors."""
  total = None
  axes_sets = mirror_axes_sets(mirror)
  for axes in axes_sets:
    flipped = jnp.flip(images, axes) if axes else images
    probs = jax.nn.softmax(logits_fn(flipped), axis=-1)
    probs = jnp.flip(probs, axes) if axes else probs
    total = probs if total is None else total + probs
  return total / len(axes_sets)


def gaussian_importance(window, sigma_scale=0.125):
  """Gaussian weights over a window (centre 1, sigma = window * sigma_scale per axis)."""
  grids = np.meshgrid(*[np.arange(w) - (w - 1) / 2 for w in window], indexing='ij')
  sigmas = [w * sigma_scale for w in window]
  weight = np.exp(-0.5 * sum((g / s)**2 for g, s in zip(grids, sigmas)))
  weight /= weight.max()
  return np.maximum(weight, 1e-3).astype(np.float32)  # no zero weight at window corners


def window_starts(size, window, overlap):
  """Start offsets along one axis: windows of `window` covering `size`, step window*(1-overlap)."""
  if window >= size:
    return [0]
  step = max(1, int(window * (1 - overlap)))
  count = int(np.ceil((size - window) / step)) + 1
  return sorted({int(round(i * (size - window) / (count - 1))) for i in range(count)})


def sliding_window_probabilities(logits_fn, images, window, overlap=0.5, mirror=False):
  """Gaussian-weighted average of window predictions over (B, X, Y, Z, C) images.

  Where a single window covers the volume this equals whole_volume_probabilities.
  """
  spatial = images.shape[1:4]
  window = tuple(min(w, s) for w, s in zip(window, spatial))
  weight = jnp.asarray(gaussian_importance(window))[None, ..., None]
  total, norm = None, jnp.zeros((1, *spatial, 1), jnp.float32)
  for start in itertools.product(*[window_starts(s, w, overlap)
                                   for s, w in zip(spatial, window)]):
    region = tuple(slice(a, a + w) for a, w in zip(start, window))
    patch = images[(slice(None), *region)]
    probs = whole_volume_probabilities(logits_fn, patch, mirror) * weight
    if total is None:
      total = jnp.zeros((*images.shape[:4], probs.shape[-1]), jnp.float32)
    total = total.at[(slice(None), *region)].add(probs)
    norm = norm.at[(slice(None), *region)].add(weight)
  return total / norm


def make_predict_fn(apply_fn, mode='whole', window=None, overlap=0.5, mirror=False,
                    compiler_options=None):
  """A jitted fn(variables, images) -> (B, X, Y, Z) predicted classes (uint8) and probabilities.

  Args:
    apply_fn: the model's apply (inference mode is passed as train=False).
    mode: 'whole' (the paper's way: the model sees the whole preprocessed volume) or
      'sliding_window' (for models trained on patches).
    window: sliding-window size (spatial).
    overlap: fraction of the window shared by neighbours.
    mirror: average over the 8 mirrored inputs (test-time augmentation).
    compiler_options: XLA options of the program (`xla_options.options`).
  """
  if mode not in MODES:
    raise ValueError(f'inference mode must be one of {MODES}, got {mode!r}')

  def predict(variables, images):
    logits_fn = functools.partial(apply_fn, variables, train=False)
    if mode == 'whole':
      probs = whole_volume_probabilities(logits_fn, images, mirror)
    else:
      probs = sliding_window_probabilities(logits_fn, images, tuple(window), overlap, mirror)
    return jnp.argmax(probs, axis=-1).astype(jnp.uint8), probs

  return jax.jit(predict, compiler_options=compiler_options)
