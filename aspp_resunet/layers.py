"""Building blocks: 3D convolution, normalisation factory and the residual block (paper eq. 3-4)."""

import functools
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aspp_resunet import xla_options

NORMS = ('batch', 'group', 'instance')
# Keras defaults (the paper's framework): running averages with momentum 0.99, epsilon 1e-3.
BATCH_NORM_MOMENTUM = 0.99
BATCH_NORM_EPSILON = 1e-3
GROUP_NORM_GROUPS = 32


CONV_IMPLS = ('auto', 'lax', 'depth2d', 'im2col', 'hybrid', 'flat')
# 'auto' on CPU picks per layer by the size of the depth-stacked input copy that 'depth2d' would
# keep for the backward pass (depth taps x input bytes): 'depth2d' up to 32 MiB (the small maps,
# where it is 1.3-9x faster than 'lax' and up to 1.8x faster than 'flat': 24^3 x 32 -> 32
# filters 15 vs 27 ms, 16^3 x 256 -> 256 0.15 vs 0.18 s), 'flat' above (benchmarks/conv_impl.py
# --experimental, forward+backward: 128^3 x 64 -> 64 filters 'flat' 6.2 s, 'hybrid' 12.0 s,
# 'im2col' 12.9 s, 'lax' 16.5 s; 64^3 x 128 -> 128: 2.3 s, 3.8 s, 3.6 s; 32^3 x 128 -> 128
# (48 MiB stacked): 'flat' 0.30 s, 'depth2d' 0.42 s; 24^3 x 256 -> 256 (41 MiB): 0.50 vs 0.60 s).
# 'flat' keeps only the input for the backward pass and copies one block of depth slices at a
# time, so its memory is that of the native convolution ('depth2d' everywhere would need 24.3 GiB
# of XLA temporaries for the paper step at 128^3). 'im2col' (rematerialised column matrices) and
# 'hybrid' ('im2col' forward, native transposed convolution for the input gradient) were the
# large-map choices before 'flat' and remain selectable.
DEPTH2D_STACK_LIMIT_BYTES = 32 * 2**20
# Above this many kernel elements per input element (taps x filters per voxel: the bridge and
# the ASPP on 6^3-8^3 maps at paper widths) 'auto' on CPU picks 'im2col' in float32, which
# multiplies the kernel as it lies: 'depth2d' and 'flat' rearrange it (forward, input and kernel
# gradient), which there costs more than the products. Forward+backward, 'depth2d' -> 'im2col':
# 6^3 x 1024 -> 1024 filters (ratio 128) 0.301 -> 0.118 s; 8^3 (54) 0.396 -> 0.221 s; ASPP 8^3
# x 1024 -> 256, dilation 6 (13.5) 0.096 -> 0.088 s; kept: 12^3 x 512 -> 512 (8) 0.175 vs
# 0.181 s; 96^3 float32 step 17.55 -> 17.11 s (A/B). Not in bfloat16, where 'im2col' computes
# in float32: the layers alone gain ('flat' -> 'im2col' 6^3 0.202 -> 0.137 s, 8^3 0.299 ->
# 0.224 s) but the 96^3 step did not measurably (10.33 -> 10.21 s, within the noise) and its
# peak RSS rose 8.68 -> 8.96 GiB.
IM2COL_MIN_KERNEL_PER_INPUT = 10
# 'im2col' builds the column matrix of this many bytes at most at a time (whole depth slices):
# one slice of a 128^3 x 64-filter map is 113 MiB of columns.
IM2COL_BLOCK_BYTES = 128 * 2**20
# 'im2col' and 'flat' compute in float32 whatever the compute dtype: XLA:CPU has no fast bfloat16
# path for the column copies and their transpose (forward+backward at 48^3 x 128 filters, bfloat16
# inputs: 3.64 s computing in bfloat16, 1.51 s in float32 as for float32 inputs;
# benchmarks/results/conv_impl_bfloat16.json). A product of two bfloat16 values is exact in
# float32, so the forward pass is a bfloat16 product with float32 accumulation. The per-layer
# choices above are made on float32 sizes, for either dtype.
IM2COL_DTYPE = jnp.float32


def _product_dtype(*operands):
  """bfloat16 for the matrix products of 'flat' when all operands hold bfloat16 values (the
  inputs and kernels of a bfloat16 model): converting their float32 columns back is exact, and
  the product accumulates in float32 either way, but XLA:CPU's bfloat16 GEMM runs 1.7x faster
  (200000 x 192 @ 192 x 576: 312 ms in float32, 179 ms in bfloat16, plus 24 ms to convert the
  columns). IM2COL_DTYPE otherwise. The decoders' upsampled convolutions ask with their input
  alone: their float32 phase kernels are rounded to it (`_upsampled_flat_conv`)."""
  return jnp.bfloat16 if all(a.dtype == jnp.bfloat16 for a in operands) else IM2COL_DTYPE


def resolve_conv_impl(conv_impl, stacked_bytes=0, dtype=jnp.float32, kernel_per_input=0):
  """'auto' -> 'lax' (one native 3D convolution) on GPU/TPU; on CPU 'flat' in bfloat16, else
  'im2col' for a kernel of more than IM2COL_MIN_KERNEL_PER_INPUT elements per input element
  (`kernel_per_input`), else 'depth2d' or 'flat' by the layer's depth-stacked copy size
  `stacked_bytes` (DEPTH2D_STACK_LIMIT_BYTES).

  In bfloat16 'flat' at every size: XLA:CPU computes a bfloat16 convolution ('depth2d') in
  float32 between conversions, while 'flat' multiplies bfloat16 operands (`_product_dtype`);
  bfloat16 training step at paper widths, 64^3: 5.61 s with the float32 rule, 4.17 s with
  'flat' everywhere; demo config 0.135 -> 0.113 s (in float32 0.098 vs 0.099 s: kept).
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}')
  if conv_impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'lax'
    if jnp.dtype(dtype) == jnp.bfloat16:
      return 'flat'
    if kernel_per_input > IM2COL_MIN_KERNEL_PER_INPUT:
      return 'im2col'
    if stacked_bytes > DEPTH2D_STACK_LIMIT_BYTES:
      return 'flat'
    return 'depth2d'
  return conv_impl


def conv3d_same(x, kernel, dilation, padding, conv_impl):
  """Stride-1 3D convolution, channels-last, `padding` [(lo, hi)] per spatial axis.

  'depth2d' computes exactly the same sum as 'lax' as one 2D convolution: the depth taps are
  folded into the input channels (a depth-shifted copy of the input per tap, concatenated) and
  the depth axis into the batch. 'im2col' computes it as matrix products, a few depth slices
  at a time (see `_im2col_conv`). 'hybrid' is 'im2col' differentiated with less memory
  (`_hybrid_conv`). 'flat' computes it as products on the flattened padded map (`_flat_conv`).
  """
  impl = _conv3d_impl(x, kernel, conv_impl)
  padding = tuple(tuple(pair) for pair in padding)  # hashable: a custom VJP's static argument
  if impl == 'lax':
    return _native_conv(x, kernel, dilation, padding)
  if impl == 'hybrid':
    return _hybrid_conv(x, kernel, dilation, padding)
  if impl == 'im2col':
    return _im2col_conv(x, kernel, dilation, padding)
  if impl == 'flat':
    if _pairs_width(x, kernel, dilation, padding):
      return _paired_flat_conv(x, kernel, padding[:2] + ((0, 0),))
    return _flat_conv(x, kernel, dilation, padding)
  batch, depth, height, width, channels = x.shape
  depth_taps = kernel.shape[0]
  padded = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
  shifted = [padded[:, tap * dilation:tap * dilation + depth] for tap in range(depth_taps)]
  stacked = shifted[0] if depth_taps == 1 else jnp.concatenate(shifted, axis=-1)
  stacked = stacked.reshape(batch * depth, height, width, depth_taps * channels)
  # (kd, kh, kw, in, out) -> (kh, kw, kd * in, out), matching the channel order of `stacked`.
  kernel_2d = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(
      kernel.shape[1], kernel.shape[2], depth_taps * channels, kernel.shape[4])
  y = jax.lax.conv_general_dilated(
      stacked, kernel_2d, window_strides=(1, 1), padding=padding[1:],
      rhs_dilation=(dilation,) * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y.reshape(batch, depth, height, width, kernel.shape[4])


def _conv3d_impl(x, kernel, conv_impl):
  """`resolve_conv_impl` for `conv3d_same` of x by kernel."""
  stacked_bytes = kernel.shape[0] * x.size * jnp.dtype(IM2COL_DTYPE).itemsize
  return resolve_conv_impl(conv_impl, stacked_bytes, x.dtype, kernel.size / x.size)


def _native_conv(x, kernel, dilation, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1, 1), padding=padding, rhs_dilation=(dilation,) * 3,
      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _hybrid_conv(x, kernel, dilation, padding):
  """The convolution computed as `_im2col_conv`, differentiated as the native one for the input
  (a native transposed convolution) and by `_im2col_kernel_gradient` for the kernel. Residuals:
  the input and the kernel only, as for the native convolution."""
  return _im2col_conv(x, kernel, dilation, padding)


def _hybrid_conv_forward(x, kernel, dilation, padding):
  return _im2col_conv(x, kernel, dilation, padding), (x, kernel)


def _hybrid_conv_backward(dilation, padding, residuals, cotangent):
  x, kernel = residuals
  # The convolution is linear in x: its transpose, without recomputing the forward pass.
  input_transpose = jax.linear_transpose(
      lambda x: _native_conv(x, kernel, dilation, padding), jax.ShapeDtypeStruct(x.shape, x.dtype))
  kernel_gradient = _im2col_kernel_gradient(x, cotangent, kernel.shape, dilation, padding)
  return input_transpose(cotangent)[0], kernel_gradient.astype(kernel.dtype)


_hybrid_conv.defvjp(_hybrid_conv_forward, _hybrid_conv_backward)


def _im2col_kernel_gradient(x, cotangent, kernel_shape, dilation, padding):
  """d(loss)/d(kernel) of a stride-1 convolution: the sum over blocks of output depth slices of
  columns(input block)^T @ cotangent block, in IM2COL_DTYPE. Only one block's column matrix
  exists at a time, and no transposed copy of the input or the cotangent."""
  _, out_depth, out_height, out_width, out_features = cotangent.shape
  rows = int(np.prod(kernel_shape[:4]))  # (kd, kh, kw, in), the kernel's row order
  block = _depth_block(x.shape[0], cotangent.shape[1:4], rows)
  halo = (kernel_shape[0] - 1) * dilation
  offsets = tap_offsets(kernel_shape, dilation)

  def add_block(total, index):
    slab = _depth_slab(x, index * block - padding[0][0], block + halo, padding[1:])
    columns = jnp.concatenate(_tap_views(slab, offsets, (block, out_height, out_width)), axis=-1)
    outputs = jax.lax.dynamic_slice_in_dim(cotangent, index * block, block, axis=1)
    return total + jnp.dot(columns.reshape(-1, rows).T,
                           outputs.astype(IM2COL_DTYPE).reshape(-1, out_features)), None

  total, _ = jax.lax.scan(add_block, jnp.zeros((rows, out_features), IM2COL_DTYPE),
                          jnp.arange(out_depth // block))
  return total.reshape(kernel_shape)


# 'flat' computes this many bytes of one block's partial products at most (whole output depth
# slices): small enough to stay in the 32 MiB L3 cache (one slice at 64^3 x 64 filters: 10 MiB).
FLAT_BLOCK_BYTES = 24 * 2**20
# Maps of at most this many features are computed in blocks of a third of FLAT_BLOCK_BYTES:
# their products and the passes over their columns and partial products are bound by memory
# (8 features at 48^3: 82-163 GFLOP/s), and a smaller share of the cache pays (demo bfloat16
# step, A/B: 0.1142 -> 0.1054 s, sides swapped 0.1064 -> 0.1013 s; the float32 demo's layers
# are 'depth2d', untouched). Wider maps' products are bound by compute: a third for them too
# made the 96^3 bfloat16 step slower (A/B twice: 19.57 -> 19.96 s and 19.10 -> 19.88 s, peak
# RSS +0.1 and +0.4 GiB).
FLAT_NARROW_FEATURES = 32


# On a CPU with AMX (`xla_options.cpu_has_amx`) bfloat16 'flat' products fold the width taps
# into their columns (`_flat_block_output`) only for maps of at most this many input or output
# channels. There the products run 4-5x faster than without AMX, and the passes over the 3x
# wider columns cost more than the 3x more partial outputs that folding saves; narrow maps still
# gain (their products are small and their partial outputs many per input value). Alone,
# forward+backward, folded -> not (issue 6 note, session 22): 96^3 x 64 -> 64 1630 -> 1420 ms,
# 48^3 x 128 -> 128 539 -> 405 ms, 24^3 x 256 -> 256 232 -> 197 ms, 48^3 x 32 -> 32 82 -> 71 ms;
# 24^3 x 16 -> 16 even (5.1 vs 5.2 ms), 48^3 x 8 -> 8 15 -> 21 ms. Without AMX folding paid or
# was even at every width (see `_flat_block_output`).
AMX_FOLD_MAX_CHANNELS = 16


def _folds_width_taps(channels, features):
  """Whether bfloat16 'flat' products of a map of `channels` -> `features` fold the width taps
  into their columns (AMX_FOLD_MAX_CHANNELS)."""
  return not (xla_options.cpu_has_amx() and min(channels, features) > AMX_FOLD_MAX_CHANNELS)


class _FlatGeometry:
  """Where `_flat_conv` (and `_upsampled_flat_conv`) read: a block of depth slices of the input,
  padded and flattened to rows (depth, height, width), in which every kernel tap is a constant
  row offset. A block holds as many output slices as keep `partials_per_feature` float32
  partial products per row and feature of the map computed (`features`; defaults: one per
  in-plane tap, the kernel's output features) within FLAT_BLOCK_BYTES, or within a third of it
  for a map of at most FLAT_NARROW_FEATURES features."""

  def __init__(self, in_shape, kernel_shape, dilation, padding, features=None,
               partials_per_feature=None):
    batch, depth, height, width, _ = in_shape
    self.padding = padding
    self.out_shape = [size + lo + hi - (k - 1) * dilation
                      for size, (lo, hi), k in zip((depth, height, width), padding, kernel_shape)]
    self.grid_height = height + sum(padding[1])
    self.grid_width = width + sum(padding[2])
    self.plane = self.grid_height * self.grid_width
    # In-plane taps (h, w) as row offsets, in the kernel's (h, w) order; depth taps whole planes.
    self.in_plane_offsets = [self.in_plane_offset(b * dilation, c * dilation)
                             for b in range(kernel_shape[1]) for c in range(kernel_shape[2])]
    self.depth_planes = [a * dilation for a in range(kernel_shape[0])]
    self.tail = self.in_plane_offsets[-1]
    # Whole planes of zeros after a block's slab so that its rows plus the in-plane tail exist.
    self.tail_planes = -(-self.tail // self.plane)
    features = kernel_shape[4] if features is None else features
    if partials_per_feature is None:
      partials_per_feature = len(self.in_plane_offsets)
    limit_bytes = FLAT_BLOCK_BYTES // 3 if features <= FLAT_NARROW_FEATURES else FLAT_BLOCK_BYTES
    self.block = _slices_per_block(
        self.out_shape[0], batch * self.plane * partials_per_feature * features * 4, limit_bytes)
    self.block_rows = self.block * self.plane
    self.length = self.block_rows + self.tail  # rows of one block's column matrix
    self.halo = (kernel_shape[0] - 1) * dilation
    self.count = self.out_shape[0] // self.block  # blocks

  def in_plane_offset(self, height_offset, width_offset):
    return height_offset * self.grid_width + width_offset

  def rows(self, x, index, dtype=IM2COL_DTYPE):
    """Block `index`'s input depth slices with the halo and tail planes (zeros outside x),
    padded in-plane, as rows (batch, rows, channels) in `dtype` (`_column_dtype`)."""
    slab = _depth_slab(x, index * self.block - self.padding[0][0],
                       self.block + self.halo + self.tail_planes, self.padding[1:], dtype)
    return slab.reshape(x.shape[0], -1, x.shape[-1])

  def window(self, rows, depth_planes):
    """The block's column rows read at a depth offset of whole planes."""
    return rows[:, depth_planes * self.plane:depth_planes * self.plane + self.length]

  def columns(self, rows, depth_planes, in_plane_offsets=(0,)):
    """A block's taps side by side: its `rows` at each of `depth_planes` (whole planes) and each
    of `in_plane_offsets` (the row offsets of in-plane taps folded into the columns, in
    ascending order), (batch, rows, len(depth_planes) * len(in_plane_offsets) * channels), as
    many rows as the in-plane taps left to the product need (`length` with none folded in)."""
    length = self.length - in_plane_offsets[-1]
    return _join_channels([rows[:, start:start + length]
                           for start in (planes * self.plane + offset
                                         for planes in depth_planes
                                         for offset in in_plane_offsets)])

  def transposed_columns(self, rows, depth_planes):
    """`columns(rows, depth_planes)` as a (d, channels) x (batch, length) matrix: a kernel
    gradient's left operand.

    Bits (bfloat16 rows) are transposed once per block, and the windows are row ranges of the
    transposed rows: transposed after the join (`_transposed`), each value was moved once per
    window (48^3 x 8 kernel gradient, 2 blocks alone: 7.8 -> 6.2 ms; 24^3 x 16 1.8 -> 1.5 ms;
    these copies in the demo bfloat16 step's profile 7.5 -> 3.1 ms; 96^3 bfloat16 step, A/B:
    20.23 -> 19.32 s). Float32 columns keep `_transposed`'s view of the join (no copy).
    """
    batch, _, channels = rows.shape
    if rows.dtype != jnp.uint16:
      columns = self.columns(rows, depth_planes)
      return _transposed(columns.reshape(-1, len(depth_planes) * channels))
    channel_rows = jnp.transpose(rows, (2, 0, 1))  # (channels, batch, rows)
    columns = jnp.concatenate([channel_rows[:, :, start:start + self.length]
                               for start in (planes * self.plane for planes in depth_planes)])
    return _operand(columns.reshape(len(depth_planes) * channels, batch * self.length))

  def crop(self, rows):
    """A block's output rows on the padded plane -> (batch, block, out height, out width, C)."""
    out_height, out_width = self.out_shape[1:]
    return rows.reshape(rows.shape[0], self.block, self.grid_height, self.grid_width, -1)[
        :, :, :out_height, :out_width]

  def placed(self, outputs, index, dtype=IM2COL_DTYPE):
    """Block `index`'s slices of an output-shaped map (a cotangent) on the padded plane (zeros
    where the forward pass cropped), between whole planes of zeros, as rows in `dtype`:
    read by `tap_window`, so that only this block's output rows count (the columns' tail rows
    are the next block's)."""
    placement = ((0, 0), (self.tail_planes,) * 2, (0, self.grid_height - self.out_shape[1]),
                 (0, self.grid_width - self.out_shape[2]), (0, 0))
    block = _depth_slices(outputs, index * self.block, self.block, dtype)
    return jnp.pad(block, placement).reshape(
        outputs.shape[0], -1, outputs.shape[-1])

  def tap_window(self, placed, offset):
    """The placed rows a tap at in-plane row `offset` multiplies: (batch, length, C)."""
    start = self.tail_planes * self.plane - offset
    return placed[:, start:start + self.length]


def _join_channels(parts):
  """jnp.concatenate(parts, axis=-1) as a sum of zero-padded parts (exact, of bits too): XLA:CPU
  fuses that into one pass that reads the parts where they lie, while its concatenate first
  copies each sliced part (96^3 x 64 -> 64 'flat' forward+backward 1.72 -> 1.62 s, 48^3 x 128
  -> 128 0.70 -> 0.67 s)."""
  width = sum(part.shape[-1] for part in parts)
  joined, start = 0, 0
  for part in parts:
    padding = [(0, 0)] * (part.ndim - 1) + [(start, width - start - part.shape[-1])]
    joined, start = joined + jnp.pad(part, padding), start + part.shape[-1]
  return joined


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _flat_conv(x, kernel, dilation, padding):
  """The convolution as matrix products on the padded input flattened to rows.

  There every tap is a row offset: a block's column matrix holds only the depth taps (kd x the
  input, not the kh x kw x kd of 'im2col'); its product with the kernel arranged (kd, in) x
  (kh, kw, out) gives every in-plane tap's partial output, which are summed at their row
  offsets. The output is computed on the padded plane and cropped. Each block copies only its
  own depth slices, so there is no padded copy of the whole input. Columns built in
  `_column_dtype`, products in `_product_dtype`, accumulated in float32.
  Backward: the input gradient is the same computation on the cotangent (flipped kernel), the
  kernel gradient `_flat_kernel_gradient`; residuals are the input and the kernel only.
  """
  return _flat_conv_output(x, kernel, dilation, padding)


def _flat_conv_output(x, kernel, dilation, padding, as_bits=False, in_plane_shape=None,
                      swapped=False):
  """`_flat_conv`'s output; with `in_plane_shape` each block's output reshaped to that
  (height, width) (`_paired_output`'s pairs back to voxels: reshaped after the loop, the map
  was copied twice, 96^3 bfloat16 step temporaries +0.1 GiB). `swapped`: the kernel's last two
  axes are (out, in) (`_flat_block_output`)."""
  geometry = _FlatGeometry(x.shape, kernel.shape, dilation, padding,
                           features=kernel.shape[3 if swapped else 4])
  block_output = _flat_block_output(x, kernel, geometry, swapped)
  if in_plane_shape is not None:
    unshaped_output = block_output
    block_output = lambda index: unshaped_output(index).reshape(
        x.shape[0], geometry.block, *in_plane_shape, -1)
  return _map_depth_blocks(block_output, geometry.count, x.dtype, as_bits)


def _flat_block_output(x, kernel, geometry, swapped=False):
  """index -> `_flat_conv`'s output depth block `index` of `geometry`, in float32.

  `swapped`: `kernel` is (kd, kh, kw, out, in), as the transposed convolution of the input
  gradient finds it, and is multiplied with its input channels as the contracted axis of the
  kernel matrix's rows (its taps and output channels moved, a copy of whole rows of input
  channels). Swapping the channel axes instead moved every value on its own: 221 ms per step
  for the bridge's 3x3x3 x 1024 x 1024 kernel alone (96^3 bfloat16 step on an AMX machine,
  ~0.5 s in all; 3072 x 9216 matrix with its product, alone: 151 -> 56 ms).

  The columns hold the block's rows at each depth tap's offset, side by side, and for
  bfloat16 products at each (depth, width) tap's: the width taps are folded into the product,
  which then gives one partial output per height tap instead of one per in-plane tap. Its
  float32 partial outputs are what a narrow layer's output pass reads (9 per output at 8
  channels, against 3 input values of columns), so in bfloat16 they cost more than the wider
  columns: demo bfloat16 step 0.199 -> 0.175 s and 0.201 -> 0.161 s (two A/B runs); at 96^3
  and 64 channels even (step 19.03 vs 18.84 s, peak RSS 6.55 vs 6.61 GiB). Float32 columns
  are as wide as the partial outputs they save, so float32 does not fold. (These figures are
  from a CPU without AMX; with AMX only narrow maps fold: `_folds_width_taps`.)
  """
  if swapped:
    kd, kh, kw, features, channels = kernel.shape
  else:
    kd, kh, kw, channels, features = kernel.shape
  product_dtype = _product_dtype(x, kernel)
  if product_dtype == jnp.bfloat16 and _folds_width_taps(channels, features):
    width_offsets, partial_offsets = geometry.in_plane_offsets[:kw], geometry.in_plane_offsets[::kw]
    # (kd, kw, in) x (kh, out); swapped, its transpose (kh, out) x (kd, kw, in)
    axes = (1, 3, 0, 2, 4) if swapped else (0, 2, 3, 1, 4)
  else:
    width_offsets, partial_offsets = (0,), geometry.in_plane_offsets
    # (kd, in) x (kh, kw, out); swapped, (kh, kw, out) x (kd, in)
    axes = (1, 2, 3, 0, 4) if swapped else (0, 3, 1, 2, 4)
  contracted_size = kd * len(width_offsets) * channels
  matrix = jnp.transpose(kernel, axes).astype(product_dtype)
  matrix = matrix.reshape(-1, contracted_size) if swapped else matrix.reshape(contracted_size, -1)
  contracted = 1 if swapped else 0  # the matrix's axis of the input channels

  def block_output(index):
    columns = geometry.columns(geometry.rows(x, index, _column_dtype(product_dtype)),
                               geometry.depth_planes, width_offsets)
    products = jax.lax.dot_general(_operand(columns), matrix,
                                   (((columns.ndim - 1,), (contracted,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    products = products.reshape(*columns.shape[:2], len(partial_offsets), features)
    return geometry.crop(sum(products[:, offset:offset + geometry.block_rows, tap]
                             for tap, offset in enumerate(partial_offsets)))

  return block_output


def _flat_conv_forward(x, kernel, dilation, padding):
  return _flat_conv_output(x, kernel, dilation, padding), (x, kernel)


def _flat_conv_backward(dilation, padding, residuals, cotangent, kernel_dtype=None):
  """The input gradient in x's dtype and the kernel gradient in `kernel_dtype` (default
  the kernel's)."""
  x, kernel = residuals
  # The transposed convolution: flipped taps, input and output channels swapped.
  flipped = kernel[::-1, ::-1, ::-1]  # its channels (in, out) are the transposed's (out, in)
  transposed_padding = tuple(((k - 1) * dilation - lo, (k - 1) * dilation - hi)
                             for (lo, hi), k in zip(padding, kernel.shape[:3]))
  x_gradient = _flat_conv_output(cotangent, flipped, dilation, transposed_padding, swapped=True)
  kernel_gradient = _flat_kernel_gradient(x, cotangent, kernel.shape, dilation, padding)
  return x_gradient.astype(x.dtype), kernel_gradient.astype(kernel_dtype or kernel.dtype)


_flat_conv.defvjp(_flat_conv_forward, _flat_conv_backward)


def _flat_kernel_gradient(x, cotangent, kernel_shape, dilation, padding):
  """d(loss)/d(kernel) of `_flat_conv`: per block, the forward's column matrix (transposed)
  times the cotangent placed on the padded plane, in the window at each in-plane tap's row
  offset (`_window_products`), summed over blocks in IM2COL_DTYPE."""
  geometry = _FlatGeometry(x.shape, kernel_shape, dilation, padding)
  kd, kh, kw, channels, features = kernel_shape
  column_dtype = _column_dtype(_product_dtype(x, cotangent))

  def add_block(total, index):
    windows = _windows_to_multiply(
        [(geometry.placed(cotangent, index, column_dtype), geometry.in_plane_offsets)],
        geometry.tap_window, _join_channels)
    columns = geometry.transposed_columns(geometry.rows(x, index, column_dtype),
                                          geometry.depth_planes)
    return total + _window_products(columns, windows), None

  total, _ = jax.lax.scan(add_block, jnp.zeros((kd * channels, kh * kw * features), IM2COL_DTYPE),
                          jnp.arange(geometry.count))
  return jnp.transpose(total.reshape(kd, channels, kh, kw, features), (0, 2, 3, 1, 4))


# Most input channels for which a bfloat16 'flat' convolution pairs width neighbours
# (`_paired_flat_conv`): the first layer (4 modalities). At 8 channels the paired input
# gradient costs more than the products gain (48^3 x 8 -> 8, forward and both gradients:
# 17.1 -> 19.1 ms).
PAIRED_MAX_CHANNELS = 4


def _pairs_width(x, kernel, dilation, padding):
  """Whether `conv3d_same` computes x by kernel as `_paired_flat_conv`: bfloat16 products, at
  most PAIRED_MAX_CHANNELS input channels, a 3-tap width kernel of dilation 1 padded (1, 1)
  and an even width."""
  return (_product_dtype(x, kernel) == jnp.bfloat16 and x.shape[-1] <= PAIRED_MAX_CHANNELS
          and kernel.shape[2] == 3 and dilation == 1 and tuple(padding[2]) == (1, 1)
          and x.shape[3] % 2 == 0)


# Where an output pair (2p, 2p + 1) reads the width-padded input pairs p and p + 1:
# _PAIR_TAPS[j, v, o, u] = 1 when element v of input pair p + j is tap u of output element o.
_PAIR_TAPS = np.array([[[[float(2 * j + v - o == u) for u in range(3)] for o in range(2)]
                        for v in range(2)] for j in range(2)], np.float32)


def _paired_kernel(kernel):
  """(kd, kh, 3, in, out) -> the (kd, kh, 2, 2 in, 2 out) kernel of the paired convolution."""
  kd, kh, _, channels, features = kernel.shape
  paired = jnp.einsum('jvou,abucf->abjvcof', _PAIR_TAPS.astype(kernel.dtype), kernel)
  return paired.reshape(kd, kh, 2, 2 * channels, 2 * features)


def _width_pairs(x):
  """x padded by one zero on each side of the width, neighbours (2p, 2p + 1) side by side in
  the channels: (batch, depth, height, (width + 2) / 2, 2 channels). Padded as bits."""
  def paired(a):
    padded = jnp.pad(a, ((0, 0), (0, 0), (0, 0), (1, 1), (0, 0)))
    return padded.reshape(*a.shape[:3], a.shape[3] // 2 + 1, 2 * a.shape[4])
  return _sliced_as_bits(x, paired)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _paired_flat_conv(x, kernel, padding):
  """`_flat_conv` of a narrow input (3-tap width padded (1, 1)) with width neighbours paired;
  `padding` is the depth and height padding, and (0, 0) for the width (`_width_pairs` pads it).

  Output pair (2p, 2p + 1) reads the padded input's voxels 2p .. 2p + 3, i.e. input pairs p
  and p + 1: the convolution is a 'flat' one over the pairs with a 2-tap width kernel, twice
  the channels and twice the filters (`_paired_kernel`, a quarter of it zeros). At 4 input
  channels that turns the products [60100, 36] x [36, 24] of a 48^3 x 4 -> 8 layer into
  [30050, 48] x [48, 48], faster than the narrow ones even with the extra (zero)
  products: forward and kernel gradient (the first layer has no input gradient) 12.7 ->
  7.5 ms, at 96^3 x 4 -> 64 355 -> 223 ms; demo bfloat16 step 0.182 -> 0.173 s (A/B). The
  kernel gradient is mapped back to the 3-tap kernel in float32, then rounded once.
  """
  return _paired_output(x, kernel, padding)


def _paired_output(x, kernel, padding):
  return _flat_conv_output(_width_pairs(x), _paired_kernel(kernel), 1, padding,
                           in_plane_shape=x.shape[2:4])


def _paired_forward(x, kernel, padding):
  return _paired_output(x, kernel, padding), (x, kernel)


def _paired_backward(padding, residuals, cotangent):
  x, kernel = residuals
  pairs, paired_kernel = _width_pairs(x), _paired_kernel(kernel)
  paired_cotangent = cotangent.reshape(*x.shape[:3], x.shape[3] // 2, -1)
  pairs_gradient, paired_kernel_gradient = _flat_conv_backward(
      1, padding, (pairs, paired_kernel), paired_cotangent, kernel_dtype=IM2COL_DTYPE)
  x_gradient = _sliced_as_bits(
      pairs_gradient, lambda a: a.reshape(*x.shape[:3], x.shape[3] + 2, -1)[:, :, :, 1:-1])
  _, unpair = jax.vjp(_paired_kernel, kernel.astype(IM2COL_DTYPE))
  return x_gradient, unpair(paired_kernel_gradient)[0].astype(kernel.dtype)


_paired_flat_conv.defvjp(_paired_forward, _paired_backward)


# Fewest output channels for which a bfloat16 kernel gradient multiplies each tap window
# separately (`_windows_to_multiply`).
WINDOW_PRODUCT_MIN_FEATURES = 64


def _windows_to_multiply(sources, tap_window, join):
  """The windows of placed cotangents (`sources`: (placed, row offsets) pairs, `tap_window`
  reads one, placed in `_column_dtype`) that a kernel gradient's columns multiply, as the
  operands of the products to make (`_window_products`).

  For bfloat16 products one product per window (XLA:CPU copies each window for its product;
  joining them in one more pass cost more: 96^3 bfloat16 step 12.17 -> 10.60 s, A/B), at
  WINDOW_PRODUCT_MIN_FEATURES channels or more (narrower products are slow: demo config, 8-32
  channels, 0.109 -> 0.121 s per step). Otherwise one product with the windows joined by
  `join` (float32 per window: 96^3 step 16.8 -> 18.5 s, Eigen repacks the transposed left
  operand per product).
  """
  placed = sources[0][0]
  if placed.dtype == jnp.uint16 and placed.shape[-1] >= WINDOW_PRODUCT_MIN_FEATURES:
    return [tap_window(_operand(placed), offset) for placed, offsets in sources
            for offset in offsets]
  return [_operand(join([tap_window(placed, offset) for placed, offsets in sources
                         for offset in offsets]))]


def _window_products(columns, windows):
  """columns @ concat(windows, channels), accumulated in IM2COL_DTYPE, one product per window."""
  products = [jnp.dot(columns, window.reshape(-1, window.shape[-1]),
                      preferred_element_type=IM2COL_DTYPE) for window in windows]
  return products[0] if len(products) == 1 else jnp.concatenate(products, axis=1)


def _transposed(matrix):
  """matrix.T for the left operand of a product; in bfloat16 a row-major copy.

  XLA:CPU hands a bfloat16 product to its fast GEMM only when the left operand is row-major;
  `matrix.T` is a column-major view, so the product ran in float32 between conversions. The
  swap on a 3-D view is a real transpose (it cannot become a layout change), fused with the
  columns' conversion. The kernel gradients' products (9802 x 192 columns, 96^3 x 64 layer):
  fwd+bwd per layer 1.35 -> 1.11 s; float32 products keep the view (no copy, same speed).
  """
  if matrix.dtype != jnp.bfloat16:
    return matrix.T
  rows, columns = matrix.shape
  return jnp.swapaxes(matrix[:, :, None], 0, 2).reshape(columns, rows)


def _column_dtype(product_dtype):
  """What 'flat' builds columns (and placed cotangents) in for products in `product_dtype`:
  IM2COL_DTYPE for float32 products; for bfloat16 ones the bfloat16 bits (uint16), which the
  gathers, selects, pads and joins of a build move as they are, where XLA:CPU computes
  bfloat16 selects and pads through float32 (5x slower than float32) and a float32 build needs
  a conversion pass before the product (96^3 x 64 layer, forward+backward: 0.91 -> 0.81-0.84 s;
  demo step 0.129 -> 0.113 s, A/B)."""
  return jnp.uint16 if product_dtype == jnp.bfloat16 else IM2COL_DTYPE


def _operand(columns):
  """Columns built in `_column_dtype` as a product's operand: bits read as bfloat16."""
  if columns.dtype == jnp.uint16:
    return jax.lax.bitcast_convert_type(columns, jnp.bfloat16)
  return columns


def _sliced_as_bits(x, slice_fn, dtype=None):
  """slice_fn(x), a dynamic slice or gather, in `dtype` (default x's; uint16: a bfloat16 x's
  bits as they are), taken from a bfloat16 x's bits (uint16).

  XLA:CPU has no bfloat16 dynamic slice or gather: it converts the array to float32 around
  them, and inside a loop over blocks that conversion of the loop-invariant array is hoisted:
  a float32 copy of the whole map, kept alive through the loop, per convolution (0.25 s for a
  96^3 x 64 map, first touch of new memory). Bits are sliced as they are.
  """
  dtype = x.dtype if dtype is None else dtype
  if x.dtype != jnp.bfloat16:
    return slice_fn(x).astype(dtype)
  bits = slice_fn(jax.lax.bitcast_convert_type(x, jnp.uint16))
  return bits if dtype == jnp.uint16 else jax.lax.bitcast_convert_type(
      bits, jnp.bfloat16).astype(dtype)


def _depth_slices(x, first, count, dtype=None):
  """Depth slices first .. first + count - 1 of x (a dynamic slice, `_sliced_as_bits`)."""
  return _sliced_as_bits(x, lambda a: jax.lax.dynamic_slice_in_dim(a, first, count, axis=1),
                         dtype)


def _depth_slab(x, first, count, in_plane_padding, dtype=IM2COL_DTYPE):
  """Depth slices first .. first + count - 1 of x, zeros where they fall outside it (the depth
  padding), padded in-plane, in `dtype` (`_column_dtype`): one block's input, without a padded
  copy of x."""
  depths = first + jnp.arange(count)
  inside = (depths >= 0) & (depths < x.shape[1])
  slab = _sliced_as_bits(x, lambda a: jnp.take(a, jnp.clip(depths, 0, x.shape[1] - 1),
                                               axis=1), dtype)
  slab = jnp.where(inside[None, :, None, None, None], slab, 0)
  return jnp.pad(slab, ((0, 0), (0, 0), *in_plane_padding, (0, 0)))


def tap_offsets(kernel_shape, dilation):
  """Offsets into the padded input read by each kernel tap, in the kernel's (d, h, w) order."""
  return [(a * dilation, b * dilation, c * dilation) for a in range(kernel_shape[0])
          for b in range(kernel_shape[1]) for c in range(kernel_shape[2])]


def _im2col_conv(x, kernel, dilation, padding):
  """The convolution as one matrix product per block of output depth slices.

  Each block's column matrix (every tap's view of the padded input, side by side) is built,
  multiplied by the flattened kernel and dropped; under `lax.map` with a rematerialised body
  the backward pass rebuilds it block by block, so no column matrix outlives its block and the
  memory stays that of the native convolution. Computed in IM2COL_DTYPE (see there).
  """
  out_shape = [size + lo + hi - (k - 1) * dilation
               for size, (lo, hi), k in zip(x.shape[1:4], padding, kernel.shape[:3])]
  padded = jnp.pad(x.astype(IM2COL_DTYPE), ((0, 0), *padding, (0, 0)))
  # rows in (kd, kh, kw, in) order
  matrix = kernel.astype(IM2COL_DTYPE).reshape(-1, kernel.shape[-1])
  block = _depth_block(x.shape[0], out_shape, matrix.shape[0])
  halo = (kernel.shape[0] - 1) * dilation
  offsets = tap_offsets(kernel.shape, dilation)

  @jax.checkpoint
  def block_product(padded, matrix, index):
    slab = jax.lax.dynamic_slice_in_dim(padded, index * block, block + halo, axis=1)
    return _columns_product(_tap_views(slab, offsets, (block, *out_shape[1:])), matrix)

  return _map_depth_blocks(lambda index: block_product(padded, matrix, index),
                           out_shape[0] // block).astype(x.dtype)


def _depth_block(batch, out_shape, columns):
  """Output depth slices per im2col block: keeps one block's column matrix (`columns` wide,
  IM2COL_DTYPE) within IM2COL_BLOCK_BYTES."""
  slice_bytes = batch * out_shape[1] * out_shape[2] * columns * jnp.dtype(IM2COL_DTYPE).itemsize
  return _slices_per_block(out_shape[0], slice_bytes, IM2COL_BLOCK_BYTES)


def _slices_per_block(depth, slice_bytes, limit_bytes):
  """The most depth slices that divide `depth` and keep a block within `limit_bytes` (at
  least one)."""
  return max(b for b in range(1, depth + 1)
             if depth % b == 0 and (b == 1 or b * slice_bytes <= limit_bytes))


def _tap_views(slab, offsets, shape):
  """The (depth, height, width) = `shape` windows of `slab` at each tap's (d, h, w) offset."""
  return [slab[:, a:a + shape[0], b:b + shape[1], c:c + shape[2]] for a, b, c in offsets]


def _columns_product(views, matrix):
  """concat(views, channels) @ matrix, accumulated in float32, in the views' dtype and shape."""
  columns = jnp.concatenate(views, axis=-1)
  product = jnp.dot(columns.reshape(-1, matrix.shape[0]), matrix,
                    preferred_element_type=jnp.float32)
  return product.astype(views[0].dtype).reshape(*views[0].shape[:-1], matrix.shape[1])


def _map_depth_blocks(block_fn, count, dtype=None, as_bits=False):
  """Runs `block_fn(i)` -> (batch, block depth, ...) for i < count in a loop (one block's
  buffers live at a time) and joins the blocks along depth, in `dtype` (default: as returned).

  With a `dtype` each block is converted in the loop (converted after it, a bfloat16 map is
  first written whole in float32, into a zero-filled buffer, and read again), and bfloat16
  blocks are stored as their bits (uint16), which XLA:CPU writes into the loop's output as
  they are, where it writes bfloat16 through float32 (96^3 x 64 'flat' forward: 0.42 s
  converted after the loop, 0.70 s bfloat16 blocks, 0.40 s bits; 96^3 bfloat16 step, A/B:
  10.91 -> 10.47 s, peak RSS 8.73 -> 8.53 GiB). Bits carry no gradient: only the custom-vjp
  paths ('flat') pass a `dtype`. `as_bits`: bfloat16 blocks are returned as bits, for a loop
  that reads slices of them (a bitcast of the whole map after the loop is a copy on XLA:CPU).
  """
  def joined(blocks):
    return jnp.moveaxis(blocks, 0, 1).reshape(blocks.shape[1], -1, *blocks.shape[3:])

  if dtype == jnp.bfloat16:
    # Joined as bits: the join of bfloat16 blocks is made through float32, and the map's bits
    # are then one more copy for `_sliced_as_bits`.
    bits = joined(jax.lax.map(
        lambda index: jax.lax.bitcast_convert_type(block_fn(index).astype(dtype), jnp.uint16),
        jnp.arange(count)))
    return bits if as_bits else jax.lax.bitcast_convert_type(bits, dtype)
  return joined(jax.lax.map(block_fn if dtype is None else
                            lambda index: block_fn(index).astype(dtype), jnp.arange(count)))


def live_taps(kernel_size, dilation, input_size):
  """Offsets (in taps from the centre) of a 'SAME' kernel axis that can read real input.

  With 'SAME' padding an off-centre tap at offset o reads input position p + o * dilation; when
  |o| * dilation >= input_size that position is outside the volume for every p, so the tap only
  ever multiplies zero padding and dropping it leaves the result exactly unchanged (the ASPP's
  rate-12 and rate-18 kernels on an 8^3 map keep only their centre tap).
  """
  half = kernel_size // 2
  return [o for o in range(-half, half + 1) if abs(o) * dilation < input_size]


# Bytes of one depth block of a 1x1x1 convolution's input (counted as float32) per
# kernel-gradient product: a few MiB, so that a block and its transposed copy stay in cache.
POINTWISE_BLOCK_BYTES = 4 * 2**20
# Most inputs of a bfloat16 1x1x1 convolution computed as a sum of broadcast products.
POINTWISE_SUM_MAX_INPUTS = 8
# Outside training, a 1x1x1 convolution of an input of more bytes than this (counted as
# float32) is multiplied over its depth blocks of POINTWISE_BLOCK_BYTES. As one product, XLA:CPU
# hands it to YNNPACK with the elementwise ops that make the input (BatchNorm, residual add,
# ReLU) fused in, and YNNPACK writes that input whole into a scratch buffer of its own, mapped
# afresh at every call, beside a map of zeros for the ReLU: the paper model's head at 128^3 (64
# channels, 512 MiB) took 0.96 s of the forward pass, two thirds of it the kernel zeroing new
# pages; in blocks 0.18 s. Paper-model inference: XLA temporaries 5.99 -> 5.49 GB, peak RSS
# 7.94 -> 7.06 GiB. In training the input is kept for the backward pass anyway and the blocks
# cost (96^3 bfloat16 step temporaries 3.24 -> 3.34 GiB): one product there (issue 6 note,
# session 20). The demo's maps are far smaller.
POINTWISE_MAP_MIN_BYTES = 64 * 2**20


def pointwise_conv(x, matrix, conv_impl):
  """A 1x1x1 convolution: x (batch, X, Y, Z, in) @ matrix (in, out), in x's dtype.

  Off 'lax' the products accumulate in float32 (`_pointwise_product`) and the kernel gradient
  is summed over depth blocks of POINTWISE_BLOCK_BYTES: it contracts every voxel into a small
  (in, out) matrix, which as one product XLA:CPU runs single-threaded, in bfloat16 after
  transposed float32 copies of both operands (decoder_0's 96^3 x 64 -> 64 shortcut in the
  96^3 bfloat16 step: 0.59 s plus 0.2 s of copies; blocked 0.05 s). 'lax' (GPU/TPU):
  autodiff of one einsum.
  """
  if _pointwise_impl(x, conv_impl) == 'lax':
    return jnp.einsum('bxyzc,cf->bxyzf', x, matrix)
  return _pointwise_conv(x, matrix)


def _pointwise_impl(x, conv_impl):
  """`resolve_conv_impl` for a 1x1x1 convolution of x: 'lax' or its own products."""
  return resolve_conv_impl(conv_impl, 0, x.dtype)


def _pointwise_product(x, matrix):
  """x (..., in) @ matrix, accumulated in float32, in x's dtype.

  XLA:CPU multiplies bfloat16 only into a float32 result (else it converts both operands to
  float32 first: a float32 copy of the whole map, 0.26 s for the 96^3 x 64 head input). A
  bfloat16 product over a few inputs (the 4 modalities, the head's 4 classes backward) is
  memory-bound: a sum of broadcast products writes the bfloat16 result in one pass (96^3,
  4 -> 64: 85 -> 32 ms; in float32 the product is as fast, 49 vs 59 ms: kept).
  """
  if _sums_pointwise(x, matrix):
    return sum(x[..., c, None].astype(jnp.float32) * matrix[c].astype(jnp.float32)
               for c in range(matrix.shape[0])).astype(x.dtype)
  return _float32_product(x, matrix).astype(x.dtype)


def _sums_pointwise(x, matrix):
  """Whether `_pointwise_product` computes x @ matrix as a sum of broadcast products."""
  return x.dtype == jnp.bfloat16 and matrix.shape[0] <= POINTWISE_SUM_MAX_INPUTS


def _blocked_pointwise_product(x, matrix):
  """`_pointwise_product` over depth blocks for an input of more than POINTWISE_MAP_MIN_BYTES
  (outside training)."""
  if x.size * 4 <= POINTWISE_MAP_MIN_BYTES or _sums_pointwise(x, matrix):
    return _pointwise_product(x, matrix)
  block = _pointwise_depth_block(x, matrix)
  return _map_depth_blocks(
      lambda index: _pointwise_product(_depth_slices(x, index * block, block), matrix),
      x.shape[1] // block, x.dtype)


def _pointwise_depth_block(x, matrix):
  """Depth slices per block of a 1x1x1 convolution of x by matrix: POINTWISE_BLOCK_BYTES of
  the wider of its input and output, counted as float32."""
  slice_bytes = x.shape[0] * x.shape[2] * x.shape[3] * max(matrix.shape) * 4
  return _slices_per_block(x.shape[1], slice_bytes, POINTWISE_BLOCK_BYTES)


def _float32_product(x, matrix):
  """x (..., in) @ matrix, accumulated and returned in float32."""
  return jnp.einsum('...c,cf->...f', x, matrix, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _pointwise_conv(x, matrix):
  """A 1x1x1 convolution; this body runs only where it is not differentiated."""
  return _blocked_pointwise_product(x, matrix)


def _pointwise_forward(x, matrix):
  return _pointwise_product(x, matrix), (x, matrix)


def _pointwise_backward(residuals, cotangent):
  x, matrix = residuals
  x_gradient = _pointwise_product(cotangent, matrix.T)
  block = _pointwise_depth_block(x, matrix)

  def add_block(total, index):
    rows, outputs = (_depth_slices(a, index * block, block).reshape(-1, a.shape[-1])
                     for a in (x, cotangent))
    return total + jnp.dot(_transposed(rows), outputs, preferred_element_type=jnp.float32), None

  total, _ = jax.lax.scan(add_block, jnp.zeros(matrix.shape, jnp.float32),
                          jnp.arange(x.shape[1] // block))
  return x_gradient, total.astype(matrix.dtype)


_pointwise_conv.defvjp(_pointwise_forward, _pointwise_backward)


@jax.custom_vjp
def upsample_nearest(x):
  """x2 nearest-neighbour upsampling of the three spatial axes of (batch, X, Y, Z, C).

  Each voxel broadcast over its 2x2x2 window (a reshape of that is the upsampled layout). The
  gradient sums each window in float32, rounded once to x's dtype: the three `jnp.repeat`s it
  replaces summed axis by axis, rounding a bfloat16 cotangent after each (1.3 ms of the demo
  bfloat16 step for decoder_0's shortcut), and a bfloat16 sum over the window accumulates in
  bfloat16 on XLA:CPU."""
  batch, depth, height, width, features = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :, None],
                          (batch, depth, 2, height, 2, width, 2, features)).reshape(
                              batch, 2 * depth, 2 * height, 2 * width, features)


def _upsample_nearest_forward(x):
  return upsample_nearest(x), None


def _upsample_nearest_backward(_, cotangent):
  # Neighbours summed along depth, height, then width, as strided slices: elementwise passes
  # XLA:CPU fuses into one, where its reduction over the window axes of `_windowed` ran 4x
  # slower alone (96^3 x 64 bfloat16: 49 -> 11 ms) and took 0.54 s in the 96^3 bfloat16 step.
  total = cotangent.astype(jnp.float32)
  for axis in (1, 2, 3):
    total = (jax.lax.slice_in_dim(total, 0, None, 2, axis) +
             jax.lax.slice_in_dim(total, 1, None, 2, axis))
  return (total.astype(cotangent.dtype),)


upsample_nearest.defvjp(_upsample_nearest_forward, _upsample_nearest_backward)


def _same_conv(x, kernel, dilation, conv_impl):
  """'SAME' stride-1 convolution by a (k, k, k, in, out) kernel, skipping taps that can only
  read padding (see `live_taps`)."""
  k = kernel.shape[0]
  keep = [live_taps(k, dilation, size) for size in x.shape[1:4]]
  # Live taps are symmetric around the centre, so the trimmed kernel is still 'SAME'.
  kernel = kernel[tuple(slice(t[0] + k // 2, t[-1] + k // 2 + 1) for t in keep)]
  if all(len(t) == 1 for t in keep):
    return pointwise_conv(x, kernel[0, 0, 0], conv_impl)
  padding = [(-t[0] * dilation, t[-1] * dilation) for t in keep]
  return conv3d_same(x, kernel, dilation, padding, conv_impl)


def _upsampled_conv(x, kernel, conv_impl):
  """`_same_conv(upsample_nearest(x), kernel)` without building the upsampled map.

  Along one axis, output 2i of a 3-tap kernel (w0, w1, w2) reads upsampled positions 2i-1, 2i,
  2i+1, i.e. coarse x[i-1], x[i], x[i], so it equals the 2-tap kernel (w0, w1 + w2) on the coarse
  map at offsets (-1, 0); output 2i+1 equals (w0 + w1, w2) at offsets (0, +1) (padding maps to
  padding). The 8 output phases are 2x2x2 convolutions of the coarse map, interleaved: 64 taps
  per coarse voxel instead of 8 x 27 = 216, and no upsampled copy to keep for the backward pass.
  A 1x1x1 kernel commutes with the upsampling.
  """
  if kernel.shape[0] == 1:
    return upsample_nearest(pointwise_conv(x, kernel[0, 0, 0], conv_impl))
  if kernel.shape[:3] != (3, 3, 3):
    raise ValueError(f'upsampled convolution needs a 1 or 3 kernel, got {kernel.shape[:3]}')
  impl = _upsampled_conv_impl(x, conv_impl)
  phase_kernels = _phase_kernels(kernel)
  if impl == 'im2col':
    return _upsampled_im2col_conv(x, phase_kernels)
  if impl == 'flat':
    return _upsampled_flat_conv(x, _stacked_phase_kernels(phase_kernels))
  phases = [conv3d_same(x, phase_kernel.astype(kernel.dtype), 1,
                        [(0, 1) if odd else (1, 0) for odd in phase], impl)
            for phase, phase_kernel in zip(PHASES, phase_kernels)]
  return _interleave_phases(jnp.stack(phases)).astype(x.dtype)


PHASES = tuple(np.ndindex(2, 2, 2))  # (x, y, z) parity of an upsampled output voxel
SAME_3_PADDING = ((1, 1),) * 3  # a 3^3 'SAME' convolution's padding


def _upsampled_conv_impl(x, conv_impl):
  """`resolve_conv_impl` for `_upsampled_conv` of the coarse map x."""
  return resolve_conv_impl(conv_impl, 2 * x.size * jnp.dtype(IM2COL_DTYPE).itemsize, x.dtype)


def _phase_kernels(kernel):
  """The 8 (2, 2, 2, in, out) kernels of `_upsampled_conv`, in PHASES order: tap sums in
  float32 at least, rounded once to the compute dtype ('flat': to its product dtype; 'im2col':
  not at all)."""
  wide = kernel.astype(jnp.promote_types(kernel.dtype, IM2COL_DTYPE))
  phase_kernels = []
  for phase in PHASES:
    phase_kernel = wide
    for axis, odd in enumerate(phase):
      first, middle, last = (jnp.take(phase_kernel, tap, axis=axis) for tap in range(3))
      pair = (first + middle, last) if odd else (first, middle + last)
      phase_kernel = jnp.stack(pair, axis=axis)
    phase_kernels.append(phase_kernel)
  return phase_kernels


def _stacked_phase_kernels(phase_kernels):
  """The phase kernels as `_upsampled_flat_conv` takes them: (p, q, r, a, b, c, in, out)."""
  return jnp.stack(phase_kernels).reshape(
      (2,) * 6 + phase_kernels[0].shape[3:]).astype(IM2COL_DTYPE)


def decoder_conv(x, skip, kernel, conv_impl):
  """The 'SAME' convolution of concat([upsample_nearest(x), skip]) by `kernel`, without
  building it: `_upsampled_conv` of x plus `_same_conv` of skip, summed; off 'lax' the sum is
  made in a loop over depth blocks (`_decoder_flat_conv` for a 3^3 kernel where both are
  'flat', `_decoder_pointwise_conv` for a 1x1x1 one)."""
  coarse = x.shape[-1]  # concat order: the upsampled map's channels, then the skip's
  up_kernel, skip_kernel = kernel[..., :coarse, :], kernel[..., coarse:, :]
  if (kernel.shape[:3] == (3, 3, 3) and _upsampled_conv_impl(x, conv_impl) == 'flat'
      and _conv3d_impl(skip, skip_kernel, conv_impl) == 'flat'):
    # min(skip.shape[1:4]) >= 2: every tap of the skip's 3^3 kernel is live (`_same_conv`).
    return _decoder_flat_conv(x, _stacked_phase_kernels(_phase_kernels(up_kernel)), skip,
                              skip_kernel)
  if kernel.shape[:3] == (1, 1, 1) and _pointwise_impl(x, conv_impl) != 'lax':
    return _decoder_pointwise_conv(x, skip, up_kernel[0, 0, 0], skip_kernel[0, 0, 0])
  return (_upsampled_conv(x, up_kernel, conv_impl) +
          _same_conv(skip, skip_kernel, 1, conv_impl))


@jax.custom_vjp
def _decoder_flat_conv(x, kernels, skip, skip_kernel):
  """`_upsampled_flat_conv(x, kernels) + _flat_conv(skip, skip_kernel)` ('SAME', 3^3): the
  skip's loop first, its output blocks kept in `_map_depth_blocks`'s bits; the upsampled loop
  adds each block of it to its own float32 block before the one rounding to the compute dtype.

  Summed after both loops, the sum was a separate pass over two maps, which XLA:CPU kept in
  float32 (excess precision: the two roundings dropped) and which the BatchNorm that follows
  kept as its residual: a float32 map of the output's size, twice its memory, written in the
  step (0.52 s for decoder_0 in the 96^3 bfloat16 step). Both products in one loop body, summed
  there, made that body's output pass twice as slow as the two loops' own (decoder_0's conv1
  forward alone at 96^3 bfloat16: 1.86 s, vs 1.60 s for two loops and a sum). Backward: the
  two convolutions' own.
  """
  return _decoder_flat_output(x, kernels, skip, skip_kernel)


def _decoder_flat_output(x, kernels, skip, skip_kernel):
  geometry = _upsampled_output_geometry(x.shape, kernels.shape[-1])
  skip_y = _flat_conv_output(skip, skip_kernel, 1, SAME_3_PADDING, as_bits=True)
  up_output = _upsampled_flat_block_output(x, kernels, geometry)
  block = 2 * geometry.block  # output slices of a coarse block

  def block_output(index):
    skip_part = jax.lax.dynamic_slice_in_dim(skip_y, index * block, block, axis=1)
    return up_output(index) + _operand(skip_part).astype(jnp.float32)

  return _map_depth_blocks(block_output, geometry.count, x.dtype)


def _decoder_flat_forward(x, kernels, skip, skip_kernel):
  return _decoder_flat_output(x, kernels, skip, skip_kernel), (x, kernels, skip, skip_kernel)


def _decoder_flat_backward(residuals, cotangent):
  x, kernels, skip, skip_kernel = residuals
  return (*_upsampled_flat_backward((x, kernels), cotangent),
          *_flat_conv_backward(1, SAME_3_PADDING, (skip, skip_kernel), cotangent))


_decoder_flat_conv.defvjp(_decoder_flat_forward, _decoder_flat_backward)


@jax.custom_vjp
def _decoder_pointwise_conv(x, skip, up_matrix, skip_matrix):
  """upsample_nearest(pointwise_conv(x, up_matrix)) + pointwise_conv(skip, skip_matrix) (the
  decoder's 1x1x1 shortcut), summed in float32 per depth block of POINTWISE_BLOCK_BYTES and
  rounded once to skip's dtype: summed after the products, XLA:CPU kept the sum in float32 (see
  `_decoder_flat_conv`; 0.53 s for decoder_0's shortcut in the 96^3 bfloat16 step). Backward:
  the two products' own."""
  return _decoder_pointwise_output(x, skip, up_matrix, skip_matrix)


def _decoder_pointwise_output(x, skip, up_matrix, skip_matrix):
  # A coarse slice: two output slices of 4x its plane, counted as float32 (as the backward's).
  slice_bytes = 8 * x.shape[0] * x.shape[2] * x.shape[3] * max(skip_matrix.shape) * 4
  block = _slices_per_block(x.shape[1], slice_bytes, POINTWISE_BLOCK_BYTES)  # coarse slices

  def block_output(index):
    coarse = _depth_slices(x, index * block, block)
    fine = _depth_slices(skip, 2 * index * block, 2 * block)
    return (upsample_nearest(_float32_product(coarse, up_matrix)) +
            _float32_product(fine, skip_matrix))

  return _map_depth_blocks(block_output, x.shape[1] // block, skip.dtype)


def _decoder_pointwise_forward(x, skip, up_matrix, skip_matrix):
  return (_decoder_pointwise_output(x, skip, up_matrix, skip_matrix),
          (x, skip, up_matrix, skip_matrix))


def _decoder_pointwise_backward(residuals, cotangent):
  _, gradients = jax.vjp(
      lambda x, skip, up_matrix, skip_matrix: (upsample_nearest(_pointwise_conv(x, up_matrix)) +
                                               _pointwise_conv(skip, skip_matrix)), *residuals)
  return gradients(cotangent)


_decoder_pointwise_conv.defvjp(_decoder_pointwise_forward, _decoder_pointwise_backward)


def _interleave_phases(stacked):
  """(8 phases, batch, X, Y, Z, C) -> (batch, 2X, 2Y, 2Z, C), phase (a, b, c) at (2i+a, ...)."""
  _, batch, *size, features = stacked.shape
  stacked = stacked.reshape(2, 2, 2, batch, *size, features)
  return jnp.transpose(stacked, (3, 4, 0, 5, 1, 6, 2, 7)).reshape(
      batch, *(2 * s for s in size), features)


def _windowed(x):
  """(batch, 2X, 2Y, 2Z, C) -> (batch, X, 2, Y, 2, Z, 2, C): each 2x2x2 window on axes 2, 4, 6."""
  batch, *size, features = x.shape
  return x.reshape(batch, size[0] // 2, 2, size[1] // 2, 2, size[2] // 2, 2, features)


def _deinterleave_phases(x):
  """The inverse of `_interleave_phases`: (batch, 2X, 2Y, 2Z, C) -> (2, 2, 2, batch, X, Y, Z, C)."""
  return jnp.transpose(_windowed(x), (2, 4, 6, 0, 1, 3, 5, 7))


def _upsampled_geometry(coarse_shape, partials_per_feature, features):
  """Where `_upsampled_flat_conv` reads: the coarse map padded by 1 on every side (a 3^3
  'SAME' grid); the phase (p, q, r) tap (a, b, c) reads padded coarse (i + p + a, j + q + b,
  k + r + c) for output (2i + p, 2j + q, 2k + r). Blocks sized for `partials_per_feature`
  partial products per coarse row and feature of the map computed, of `features`."""
  return _FlatGeometry(coarse_shape, (3, 3, 3), 1, SAME_3_PADDING, features,
                       partials_per_feature)


def _upsampled_output_geometry(coarse_shape, features):
  """`_upsampled_geometry` of the forward pass and the kernel gradient: per row 2 depth
  parities x 16 in-plane partial outputs of `features`."""
  return _upsampled_geometry(coarse_shape, 32, features)


@jax.custom_vjp
def _upsampled_flat_conv(x, kernels):
  """The 8 phase convolutions of `_upsampled_conv` ('flat'), all in one loop over depth blocks.

  `kernels`: (p, q, r, a, b, c, in, out) in IM2COL_DTYPE. Per block and depth parity p, one
  column matrix (depth taps p, p + 1 of the padded coarse map) times the kernels arranged
  (a, in) x (q, r, b, c, out) gives all 16 in-plane partial outputs of that parity, summed at
  their row offsets and interleaved (bfloat16: width taps folded in, one product per width
  parity too, `_upsampled_flat_block_output`). Backward: the input gradient per in-plane
  parity (q, r) from the cotangent's 4 phases of that parity (both depth parities in one
  column matrix), the kernel gradient per depth parity; residuals are x and the kernels.
  Compared with 8 separate 'flat' convolutions (coarse 64^3 x 128 -> 64, forward+backward):
  2.57 -> 2.17 s, 1057 -> 161 MiB of XLA temporaries; 48^3: 1.22 -> 0.93 s.

  Products in `_product_dtype(x)`: a bfloat16 model's phase kernels are rounded to bfloat16
  (once, as the other implementations of `_upsampled_conv` round them: an error the size of
  the input's own rounding to bfloat16). Multiplied in float32, the decoders' products ran at
  half the rate of the step's bfloat16 ones (96^3 step, decoder_0: forward 168 GFLOP/s, input
  gradient 95, others 300-400; decoder_0's conv1 alone, forward 1.83 -> 1.33 s, forward and
  backward 2.88 -> 2.55 s). The kernels' gradient stays float32: summed into the kernel's,
  rounded once.
  """
  return _upsampled_flat_output(x, kernels)


def _upsampled_flat_output(x, kernels):
  geometry = _upsampled_output_geometry(x.shape, kernels.shape[-1])
  return _map_depth_blocks(_upsampled_flat_block_output(x, kernels, geometry), geometry.count,
                           x.dtype)


def _upsampled_flat_block_output(x, kernels, geometry):
  """index -> `_upsampled_flat_conv`'s output for coarse depth block `index` of `geometry`
  (2 x its slices), in float32.

  For bfloat16 products the width taps are folded into the columns, as in `_flat_block_output`:
  one product per depth parity p and width parity r, columns at width offsets r + c (taps c = 0,
  1) times the kernels arranged (a, c, in) x (q, b, out); 8 partial outputs per row instead of
  16. Alone, decoder_0's conv1 forward: demo 4.8 -> 3.7 ms, 96^3 581 -> 552 ms; bfloat16 step,
  A/B: demo 0.1235 -> 0.1172 s, 96^3 19.89 -> 19.16 s. With all 3 width offsets in one product
  per p (zeros where r + c is not one), alone 4.8 -> 5.3 and 569 -> 749 ms.
  """
  product_dtype = _product_dtype(x)
  kernels = kernels.astype(product_dtype)  # (p, q, r, a, b, c, in, out)

  def matrix(kernel, contracted):  # the `contracted` axes first and flattened, then the others
    kernel = jnp.moveaxis(kernel, contracted, range(len(contracted)))
    return kernel.reshape(np.prod(kernel.shape[:len(contracted)]), -1)

  # (depth parity, width parities, width offsets of the columns, matrix) of each product
  if product_dtype == jnp.bfloat16 and _folds_width_taps(*kernels.shape[-2:]):
    # (a, c, in) x (q, b, out)
    products_to_make = [(p, (r,), (r, r + 1), matrix(kernels[p, :, r], (1, 3, 4)))
                        for p, r in np.ndindex(2, 2)]
  else:  # (a, in) x (q, r, b, c, out)
    products_to_make = [(p, (0, 1), (0,), matrix(kernels[p], (2, 5))) for p in (0, 1)]

  def block_output(index):
    rows = geometry.rows(x, index, _column_dtype(product_dtype))
    phases = {}
    for p, width_parities, width_offsets, kernel_matrix in products_to_make:
      columns = geometry.columns(rows, (p, p + 1), width_offsets)
      width_taps = 2 // len(width_offsets)  # width taps c left to the partial outputs
      products = jnp.dot(_operand(columns), kernel_matrix,
                         preferred_element_type=jnp.float32).reshape(
                             *columns.shape[:2], 2, len(width_parities), 2, width_taps, -1)
      for q, (i, r) in itertools.product((0, 1), enumerate(width_parities)):
        offsets = {(b, c): geometry.in_plane_offset(q + b, r + c - width_offsets[0])
                   for b, c in np.ndindex(2, width_taps)}
        phases[p, q, r] = geometry.crop(sum(
            products[:, offset:offset + geometry.block_rows, q, i, b, c]
            for (b, c), offset in offsets.items()))
    return _interleave_phases(jnp.stack([phases[phase] for phase in PHASES]))

  return block_output


def _upsampled_flat_forward(x, kernels):
  return _upsampled_flat_output(x, kernels), (x, kernels)


def _upsampled_flat_backward(residuals, cotangent):
  x, kernels = residuals
  phases = _deinterleave_phases(cotangent)  # one copy, read by both gradients
  return (_upsampled_flat_input_gradient(phases, kernels, x.shape, x.dtype),
          _upsampled_flat_kernel_gradient(x, phases, kernels.shape).astype(kernels.dtype))


_upsampled_flat_conv.defvjp(_upsampled_flat_forward, _upsampled_flat_backward)


def _upsampled_flat_input_gradient(phases, kernels, coarse_shape, dtype):
  """x's gradient: input (i, j, k) receives kernel (p, q, r, a, b, c) times the cotangent's
  phase (p, q, r) at (i + 1 - p - a, j + 1 - q - b, k + 1 - r - c), i.e. at padded depth
  offset 2 - p - a and in-plane offset (2 - q - b, 2 - r - c) on the same padded grid."""
  channels, features = coarse_shape[-1], kernels.shape[-1]
  geometry = _upsampled_geometry(coarse_shape, 4, channels)
  product_dtype = _product_dtype(phases)
  depth_taps = list(np.ndindex(2, 2))  # (p, a)
  # (b, c, in) x (p, a, out), multiplied transposed: the kernels' channels stay as they lie
  # (moving the minor axis copies value by value, as in `_flat_block_output`'s `swapped`).
  matrices = {(q, r): jnp.stack([kernels[p, q, r, a] for p, a in depth_taps], axis=3).astype(
      product_dtype).reshape(4 * channels, 4 * features) for q, r in np.ndindex(2, 2)}

  def block_output(index):
    total = 0
    for q, r in np.ndindex(2, 2):
      rows = [geometry.rows(phases[p, q, r], index, _column_dtype(product_dtype))
              for p in (0, 1)]
      columns = _join_channels([geometry.window(rows[p], 2 - p - a) for p, a in depth_taps])
      products = jax.lax.dot_general(
          _operand(columns), matrices[q, r], (((2,), (1,)), ((), ())),
          preferred_element_type=jnp.float32).reshape(
              coarse_shape[0], geometry.length, 2, 2, channels)
      for b, c in np.ndindex(2, 2):
        offset = geometry.in_plane_offset(2 - q - b, 2 - r - c)
        total = total + products[:, offset:offset + geometry.block_rows, b, c]
    return geometry.crop(total)

  return _map_depth_blocks(block_output, geometry.count, dtype)


def _upsampled_flat_kernel_gradient(x, phases, kernels_shape):
  """The kernels' gradient, per block and depth parity p: the forward's column matrix
  (transposed) times the cotangent's 4 phases of parity p, placed, in the windows at their 4
  taps' row offsets (`_window_products`), multiplied in `_product_dtype`, summed over blocks
  in IM2COL_DTYPE."""
  channels, features = x.shape[-1], kernels_shape[-1]
  geometry = _upsampled_output_geometry(x.shape, features)
  column_dtype = _column_dtype(_product_dtype(x, phases))

  def add_block(total, index):
    rows = geometry.rows(x, index, column_dtype)
    products = []
    for p in (0, 1):
      sources = [(geometry.placed(phases[p, q, r], index, column_dtype),
                  [geometry.in_plane_offset(q + b, r + c) for b, c in np.ndindex(2, 2)])
                 for q, r in np.ndindex(2, 2)]
      # 16 windows: one concatenation pass joins them faster than `_join_channels`'s sum of
      # padded parts, whose every element tests each part (kernel gradient at 48^3: 0.51 vs
      # 0.91 s).
      windows = _windows_to_multiply(sources, geometry.tap_window,
                                     functools.partial(jnp.concatenate, axis=-1))
      products.append(_window_products(
          geometry.transposed_columns(rows, [p + a for a in (0, 1)]), windows))
    return total + jnp.stack(products), None

  total, _ = jax.lax.scan(add_block,
                          jnp.zeros((2, 2 * channels, 16 * features), IM2COL_DTYPE),
                          jnp.arange(geometry.count))
  # (p, a, in, q, r, b, c, out) -> (p, q, r, a, b, c, in, out)
  return jnp.transpose(total.reshape(2, 2, channels, 2, 2, 2, 2, features),
                       (0, 3, 4, 1, 5, 6, 2, 7))


@jax.custom_vjp
def max_pool_2x(x):
  """2x2x2 max pooling, stride 2, of (batch, X, Y, Z, C) with even X, Y, Z (nn.max_pool's
  values). The gradient goes to the first maximum of each window, like TensorFlow's."""
  return _max_pool_2x_forward(x)[0]


def _max_pool_2x_forward(x):
  # Each window's maximum and the PHASES index (4a + 2b + c) of its first maximum, in one
  # variadic reduction over the window's 8 strided views (a reduction XLA:CPU does not fuse into
  # the backward pass's consumer, which would keep the 8 views alive until then). Compared in
  # float32 (exact for bfloat16): XLA:CPU's bfloat16 reduction converted each comparison and
  # ran 4-5x slower (alone, 48^3 x 8: 4.4 -> 1.1 ms; 96^3 x 64: 266 -> 51 ms; in the demo
  # bfloat16 step's profile the three poolings took 3.1 ms, now 0.1-0.2).
  wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  views = jnp.stack([wide[:, a::2, b::2, c::2] for a, b, c in PHASES])
  positions = jax.lax.broadcasted_iota(jnp.int8, views.shape, 0)

  def first_maximum(a, b):
    a_wins = (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] < b[1]))
    return jnp.where(a_wins, a[0], b[0]), jnp.where(a_wins, a[1], b[1])

  best, first = jax.lax.reduce((views, positions),
                               (jnp.array(-jnp.inf, wide.dtype), jnp.int8(len(PHASES))),
                               first_maximum, (0,))
  # Only the int8 window position is kept for the backward pass (XLA:CPU's own max-pool
  # gradient keeps four int32 index maps of the full input: 2 GiB at 128^3 x 64).
  return best.astype(x.dtype), first


def _window_positions(shape, dtype):
  """The PHASES index (4a + 2b + c) of each voxel of a (batch, 2X, 2Y, 2Z, C) map in its
  2x2x2 window."""
  return sum((jax.lax.broadcasted_iota(dtype, shape, axis) % 2) * weight
             for axis, weight in ((1, 4), (2, 2), (3, 1))).astype(dtype)


def _max_pool_2x_backward(first, cotangent):
  # Each pooled voxel's window as broadcasts of the pooled maps (`upsample_nearest`): one
  # elementwise pass, where 8 selected phase maps interleaved by a transpose made
  # XLA:CPU emit a scalar loop for the fusion and its consumers (48^3 demo bfloat16 step:
  # 10.2 -> 0.65 ms in encoder_0's backward).
  spread_first = upsample_nearest(first)
  gradient = jnp.where(spread_first == _window_positions(spread_first.shape, first.dtype),
                       upsample_nearest(cotangent), jnp.zeros((), cotangent.dtype))
  return (gradient,)


max_pool_2x.defvjp(_max_pool_2x_forward, _max_pool_2x_backward)


def _upsampled_im2col_conv(x, phase_kernels):
  """The 8 phase convolutions of `_upsampled_conv` as matrix products, all phases of a block
  of depth slices in one step of one loop (8 separate loops keep 8 sets of buffers alive)."""
  _, depth, height, width, _ = x.shape
  padded = jnp.pad(x.astype(IM2COL_DTYPE), ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  matrices = jnp.stack([k.astype(IM2COL_DTYPE).reshape(-1, k.shape[-1]) for k in phase_kernels])
  block = _depth_block(x.shape[0], x.shape[1:4], matrices.shape[1])
  taps = tap_offsets((2, 2, 2), 1)

  @jax.checkpoint
  def block_product(padded, matrices, index):
    slab = jax.lax.dynamic_slice_in_dim(padded, index * block, block + 2, axis=1)
    # Phase parity 0 reads coarse offsets (-1, 0), parity 1 (0, +1): padded index + parity.
    return _interleave_phases(jnp.stack([
        _columns_product(_tap_views(slab, [(p + a, q + b, r + c) for a, b, c in taps],
                                    (block, height, width)), matrix)
        for matrix, (p, q, r) in zip(matrices, PHASES)]))

  return _map_depth_blocks(lambda index: block_product(padded, matrices, index),
                           depth // block).astype(x.dtype)


class Conv3D(nn.Module):
  """3D 'SAME' convolution, stride 1, channels-last; params float32, compute in `dtype`.

  Parameters are named like nn.Conv ('kernel' (k, k, k, in, out), 'bias'), so checkpoints do
  not depend on how the convolution is computed (`conv_impl`, see `conv3d_same`). Taps that
  can only read padding are skipped. With `skip`, the input is the decoder's
  concat([upsample_nearest(x), skip]), computed without building it (`_upsampled_conv`).
  """

  features: int
  kernel_size: int = 3
  dilation: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  # Keras' default (the paper's framework); also compiles far faster on XLA:CPU than the
  # truncated normal of he_normal (15 s vs 1 s for a small model's init).
  kernel_init: Any = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, x, skip=None):
    in_features = x.shape[-1] + (0 if skip is None else skip.shape[-1])
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, k, in_features, self.features),
                        self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if skip is None:
      y = _same_conv(x, kernel, self.dilation, self.conv_impl)
    else:
      if self.dilation != 1:
        raise ValueError('the upsampled (decoder) convolution is not dilated')
      y = decoder_conv(x, skip.astype(self.dtype), kernel, self.conv_impl)
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)
      y = add_bias(y, bias)
    return y


@jax.custom_vjp
def add_bias(y, bias):
  """y + bias (per channel, cast to y's dtype), whose bias gradient is the cotangent's
  per-channel sum in float32 (`_channel_sums`), returned in the bias's dtype: autodiff summed
  a float32 copy of the head's cotangent with a reduce-window (1.2 ms + 0.3 ms in the demo
  bfloat16 step) and rounded the sum to y's dtype."""
  return y + bias.astype(y.dtype)


def _add_bias_forward(y, bias):
  return add_bias(y, bias), bias


def _add_bias_backward(bias, cotangent):
  return cotangent, _channel_sums(lambda g: (g,), cotangent)[0].astype(bias.dtype)


add_bias.defvjp(_add_bias_forward, _add_bias_backward)


def make_norm(kind, train, dtype, name, momentum=BATCH_NORM_MOMENTUM):
  """A normalisation layer: 'batch' (running stats), 'group' (32 groups) or 'instance'."""
  if kind == 'batch':
    return BatchNorm(use_running_average=not train, momentum=momentum, dtype=dtype, name=name)
  if kind == 'group':
    return _GroupNorm(num_groups=GROUP_NORM_GROUPS, dtype=dtype, name=name)
  if kind == 'instance':
    return _GroupNorm(num_groups=None, dtype=dtype, name=name)
  raise ValueError(f'norm must be one of {NORMS}, got {kind!r}')


# `_channel_sums` takes as many depth slices at a time as keep the float32 slices of its maps
# within this many bytes: on the demo's 48^3 x 8 maps one slice per loop step cost more in
# per-step overhead than the sums (BatchNorm forward+backward 3.35 -> 1.54 ms; demo bfloat16
# step 0.173 -> 0.154 s, float32 even, A/B); a 96^3 x 64 slice is larger (one per step).
CHANNEL_SUM_BLOCK_BYTES = 4 * 2**20


def _channel_sums(terms, *maps):
  """Per-channel sums (over all axes but the last) of each map in terms(*maps), the maps (or
  their slices) handed to `terms` in float32.

  On CPU the sums are taken over blocks of depth slices in a loop (CHANNEL_SUM_BLOCK_BYTES),
  each block's terms made where they are read (bfloat16 slices converted there): XLA:CPU sums
  a whole map with YNNPACK, which takes a materialised input, so each sum of a converted map or
  of a product of maps first writes a float32 map of its own. BatchNorm forward+backward at
  96^3 x 64: bfloat16 0.150 -> 0.069 s, float32 0.093 -> 0.087 s; 96^3 step, A/B: bfloat16
  10.82 -> 10.67 s, peak RSS 8.35 -> 7.57 GiB; float32 18.36 -> 17.43 s, 9.30 -> 7.57 GiB.
  """
  axes = tuple(range(maps[0].ndim - 1))
  if maps[0].ndim < 3 or jax.default_backend() != 'cpu':
    return [term.sum(axes) for term in terms(*(m.astype(jnp.float32) for m in maps))]

  depth = maps[0].shape[1]
  block = _slices_per_block(depth, maps[0].size // depth * 4 * len(maps),
                            CHANNEL_SUM_BLOCK_BYTES)

  def slice_sums(index):
    slices = [_depth_slices(m, index * block, block, jnp.float32) for m in maps]
    return [term.sum(axes[1:]) for term in terms(*slices)]

  # Per example until after the loop: with the batch split over devices, the loop's sums stay
  # on each device and the devices' totals are added once.
  totals, _ = jax.lax.scan(lambda totals, index: ([
      total + part for total, part in zip(totals, slice_sums(index))], None),
                           slice_sums(0), jnp.arange(1, depth // block))
  return [total.sum(0) for total in totals]


def _batch_statistics(x):
  """Per-channel mean and variance (E[x^2] - E[x]^2, clipped at 0) of x, in float32."""

  total, total_of_squares = _channel_sums(lambda x: (x, x * x), x)
  count = np.prod(x.shape[:-1])
  mean = total / count
  return mean, jnp.maximum(0.0, total_of_squares / count - mean * mean)


def _normalise(x, mean, var, scale, bias, epsilon, dtype):
  """(x - mean) * scale / sqrt(var + epsilon) + bias, in float32, cast to `dtype`."""
  multiplier = jax.lax.rsqrt(var + epsilon) * scale
  return ((x.astype(jnp.float32) - mean) * multiplier + bias).astype(dtype)


def _batch_norm_forward(x, scale, bias, epsilon, dtype):
  mean, var = _batch_statistics(x)
  return (_normalise(x, mean, var, scale, bias, epsilon, dtype), mean, var), (x, mean, var, scale)


def _batch_norm_backward(epsilon, dtype, residuals, cotangents):
  # Two per-channel sums over (g, x), then one elementwise pass: the centred input is made on
  # the fly, never stored.
  del dtype
  x, mean, var, scale = residuals
  output_cotangent, mean_cotangent, var_cotangent = cotangents
  count = np.prod(x.shape[:-1])
  inverse_std = jax.lax.rsqrt(var + epsilon)
  bias_gradient, centred_gradient = _channel_sums(lambda g, x: (g, g * (x - mean)),
                                                  output_cotangent, x)
  normalised_gradient = centred_gradient * inverse_std  # = the scale's gradient
  g = output_cotangent.astype(jnp.float32)
  centred = x.astype(jnp.float32) - mean
  x_gradient = (scale * inverse_std * (
      g - (bias_gradient + centred * inverse_std * normalised_gradient) / count)
                # The statistics' own cotangents (zero when they only feed the running averages);
                # the clip of the variance at 0 is taken as not active.
                + (mean_cotangent + 2 * var_cotangent * centred) / count)
  return x_gradient.astype(x.dtype), normalised_gradient, bias_gradient


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon, dtype):
  """Training-mode BatchNorm over all axes but the last: (y, batch mean, batch variance).

  The gradient keeps only x (in its own dtype) and per-channel figures: differentiating the
  formula instead keeps x and its centred float32 copy, two more maps of the block's size
  at the backward pass's peak.
  """
  return _batch_norm_forward(x, scale, bias, epsilon, dtype)[0]


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)


class BatchNorm(nn.Module):
  """flax's nn.BatchNorm (same variables, fast variance, float32 statistics and parameters),
  with a training-mode gradient that does not store the centred input (`batch_norm_train`)."""

  use_running_average: bool
  momentum: float = BATCH_NORM_MOMENTUM
  epsilon: float = BATCH_NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (x.shape[-1],)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    if self.use_running_average:
      return _normalise(x, running_mean.value, running_var.value, scale, bias, self.epsilon,
                        self.dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.dtype)
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
    return y


class _GroupNorm(nn.Module):
  """GroupNorm with min(groups, channels) groups; num_groups=None is instance norm."""

  num_groups: int | None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    groups = channels if self.num_groups is None else int(np.gcd(self.num_groups, channels))
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=self.dtype,
                        param_dtype=jnp.float32, name='norm')(x)


# The parameters each half of a residual block uses (ResidualBlock's `part`).
RESIDUAL_BLOCK_PARTS = {'first': ('conv1', 'norm1'),
                        'second': ('conv2', 'norm2', 'shortcut_conv', 'shortcut_norm')}


class ResidualBlock(nn.Module):
  """y = ReLU(BN(conv3(ReLU(BN(conv3(x))))) + shortcut(x)); shortcut = conv1 + BN if needed."""

  features: int
  norm: str = 'batch'
  dtype: Any = jnp.float32
  bn_momentum: float = BATCH_NORM_MOMENTUM
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train, skip=None, hidden=None, part='whole'):
    """`skip`: the decoder's form, the block input being concat([upsample_nearest(x), skip]).

    `part` 'first' returns the hidden map ReLU(BN(conv3(x))); 'second' finishes the block from
    that `hidden` map (and x, for the shortcut); 'whole' does both.
    """
    conv = functools.partial(Conv3D, features=self.features, dtype=self.dtype,
                             conv_impl=self.conv_impl)
    norm = functools.partial(make_norm, self.norm, train, self.dtype, momentum=self.bn_momentum)
    if part != 'second':
      hidden = nn.relu(norm('norm1')(conv(kernel_size=3, name='conv1')(x, skip)))
      if part == 'first':
        return hidden
    y = norm('norm2')(conv(kernel_size=3, name='conv2')(hidden))
    in_features = x.shape[-1] + (0 if skip is None else skip.shape[-1])
    if in_features != self.features:
      shortcut = conv(kernel_size=1, name='shortcut_conv')(x, skip)
      shortcut = norm('shortcut_norm')(shortcut)
    elif skip is None:
      shortcut = x.astype(self.dtype)
    else:
      shortcut = jnp.concatenate([upsample_nearest(x), skip], axis=-1).astype(self.dtype)
    return nn.relu(y + shortcut)
