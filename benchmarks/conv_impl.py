"""3D convolution on XLA:CPU: native `lax` vs `depth2d`, `im2col` and `hybrid` (layers.conv3d_same),
forward and forward+backward, on the shapes of the demo and paper models, in float32 or bfloat16.

python benchmarks/conv_impl.py [--shapes=48x8x8,24x16x16,...]   (size x in x out [x dilation])
Writes benchmarks/results/conv_impl.json. With --experimental it also times a formulation tried
for issue 6 and not adopted (a sum of one matrix product per tap), checks every formulation
against `lax` and reports XLA's temporary memory of forward+backward:
python benchmarks/conv_impl.py --experimental --shapes=96x64x64,64x128x128,32x256x256,16x512x512 \
    --output=benchmarks/results/conv_impl_experimental.json
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aspp_resunet import host_memory  # noqa: E402

if __name__ == '__main__':
  host_memory.restart_with_huge_pages()  # before the heavy imports, as the programs

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from aspp_resunet import layers  # noqa: E402
from benchmarks import common  # noqa: E402

flags.DEFINE_list('shapes', ['48x8x8', '48x16x8', '24x16x16', '12x32x32', '6x64x32x2',
                             '16x256x256', '8x512x512', '8x1024x256x6'],
                  'Cubic input size x input channels x output channels [x dilation].')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Input and kernel dtype.')
flags.DEFINE_list('impls', None, 'Formulations to time (default: all of them).')
flags.DEFINE_integer('repeats', 5, 'Timed calls (median) after one compiling call.')
flags.DEFINE_string('output', 'benchmarks/results/conv_impl.json', 'Result JSON.')
flags.DEFINE_bool('experimental', False, 'Also time the tap-sum formulation, check every '
                  'formulation against lax and report XLA temporary memory.')
FLAGS = flags.FLAGS


def tap_sum_conv(x, kernel, dilation, padding):
  """One matrix product per kernel tap on a shifted view, accumulated in float32."""
  _, depth, height, width, _ = x.shape
  padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  total = 0
  for (a, b, c), weights in zip(layers.tap_offsets(kernel.shape, dilation),
                                kernel.reshape(-1, *kernel.shape[3:])):
    view = padded[:, a:a + depth, b:b + height, c:c + width]
    total = total + jnp.einsum('bdhwc,cf->bdhwf', view, weights,
                               preferred_element_type=jnp.float32)
  return total.astype(x.dtype)


def _formulations():
  formulations = {impl: functools.partial(layers.conv3d_same, conv_impl=impl)
                  for impl in layers.CONV_IMPLS if impl != 'auto'}
  if FLAGS.experimental:
    formulations['tap_sum'] = tap_sum_conv
  if FLAGS.impls:
    formulations = {impl: formulations[impl] for impl in FLAGS.impls}
  return formulations


def _median_seconds(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - started)
  return float(np.median(times))


def main(argv):
  del argv
  rows = []
  for spec in FLAGS.shapes:
    size, in_features, out_features, dilation = (int(v) for v in (spec + 'x1').split('x')[:4])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, size, size, size, in_features)), FLAGS.dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, in_features, out_features)) * 0.1,
                         FLAGS.dtype)
    padding = [(dilation, dilation)] * 3
    flops = 2 * size**3 * 27 * in_features * out_features
    row = {'shape': spec, 'dtype': FLAGS.dtype, 'flops_forward': flops}
    for impl, formulation in _formulations().items():
      conv = functools.partial(formulation, dilation=dilation, padding=padding)
      forward = jax.jit(conv)
      backward = jax.jit(jax.grad(lambda x, k, conv=conv: jnp.sum(
          conv(x, k).astype(jnp.float32)**2), (0, 1)))
      row[f'{impl}_forward_seconds'] = _median_seconds(forward, x, kernel)
      row[f'{impl}_forward_backward_seconds'] = _median_seconds(backward, x, kernel)
      row[f'{impl}_forward_backward_gflops'] = 3 * flops / row[
          f'{impl}_forward_backward_seconds'] / 1e9
      if FLAGS.experimental:
        reference = layers.conv3d_same(x, kernel, dilation, padding, 'lax')
        row[f'{impl}_max_abs_difference_vs_lax'] = float(jnp.max(jnp.abs(forward(x, kernel) -
                                                                          reference)))
        memory = backward.lower(x, kernel).compile().memory_analysis()
        row[f'{impl}_forward_backward_temp_mib'] = memory.temp_size_in_bytes / 2**20
        print(f'{spec:14s} {impl:15s} fwd+bwd {row[f"{impl}_forward_backward_seconds"]:.3f} s, '
              f'{row[f"{impl}_forward_backward_gflops"]:.0f} GFLOP/s, XLA temporaries '
              f'{row[f"{impl}_forward_backward_temp_mib"]:.0f} MiB', flush=True)
    rows.append(row)
    print(spec, ', '.join(f'{impl} {row[f"{impl}_forward_backward_seconds"] * 1e3:.1f} ms'
                          for impl in _formulations()), '(forward+backward)', flush=True)
  common.write_result(FLAGS.output, {'rows': rows})
  print(f'wrote {FLAGS.output}')


if __name__ == '__main__':
  app.run(main)
