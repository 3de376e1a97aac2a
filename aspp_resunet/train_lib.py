"""Training and per-epoch validation of the (ASPP-)ResUNet: data-parallel, checkpointed."""

import functools
import json
import logging
import math
import os
import time
from typing import Any

from clu import metric_writers
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import optax
import tqdm

from aspp_resunet import checkpointing
from aspp_resunet import labels
from aspp_resunet import losses
from aspp_resunet import metrics
from aspp_resunet import models
from aspp_resunet import staged_step
from aspp_resunet import xla_options
from data_pipelines import brats
from data_pipelines import input_pipeline
from data_pipelines import synthetic
from data_pipelines import tfds_brats

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'


def is_main_process():
  """Process 0 logs, writes the config and metrics, and prepares the dataset."""
  return jax.process_index() == 0


def report(message):
  """A progress line for the user, from process 0 only."""
  if is_main_process():
    print(message, flush=True)


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, bad configuration); the message is one line."""


class TrainState(train_state.TrainState):
  """Train state with BatchNorm running statistics (empty for group/instance norm)."""

  batch_stats: Any = None


def make_mesh():
  """A 1D mesh over every device of every process; the batch is split along 'data'."""
  return Mesh(np.asarray(jax.devices()), ('data',))


SCHEDULES = ('constant', 'cosine')


def learning_rate_schedule(train_config, total_steps):
  """`train.schedule`: 'constant' (paper) or linear warm-up then cosine decay to 0 at the end."""
  base = float(train_config.learning_rate)
  # Workdirs trained before schedules existed have no `schedule` field: they were constant.
  if train_config.get('schedule', 'constant') == 'constant':
    return base  # a float, not a schedule: the optimizer state has no step counter
  warmup = min(int(train_config.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else base, peak_value=base, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(train_config, total_steps):
  if train_config.optimizer != 'adam':
    raise TrainingError(f"train.optimizer must be 'adam', got {train_config.optimizer!r}")
  return optax.adam(learning_rate_schedule(train_config, total_steps))


def create_train_state(config, model, rng, total_steps=1):
  """Initialises parameters (float32) and the optimizer state, replicated over the mesh.

  `total_steps` only sets the length of a decaying learning-rate schedule; a template for
  restoring a checkpoint can leave it at 1.
  """
  sample = jnp.zeros((1, *config.data.image_size, labels.NUM_CHANNELS), jnp.float32)
  tx = make_optimizer(config.train, total_steps)

  def init(rng):
    variables = model.init(rng, sample, train=False)
    return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                             batch_stats=variables.get('batch_stats', {}))

  # One compiled program (not one per optimizer-state leaf).
  return jax.jit(init)(rng)


def train_step(state, batch, loss_name):
  """One optimizer step; returns the new state, the loss and per-example region counts."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
        mutable=['batch_stats'])
    return losses.compute_loss(loss_name, logits, batch['label'], batch['mask']), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads,
                                batch_stats=updates.get('batch_stats', state.batch_stats))
  counts = metrics.region_counts(jnp.argmax(logits, axis=-1), batch['label'])
  return state, {'loss': loss, 'counts': counts}


def make_train_fn(config, model, replicated, state=None, batch=None):
  """`(state, batch) -> (state, metrics)`: one program ('fused'), or one per segment ('staged').

  'auto' (needs `state` and `batch`, arrays or shapes): 'fused' on GPU/TPU, and on CPU when the
  compiled fused step fits in FUSED_MEMORY_FRACTION of the available memory, else 'staged'.
  """
  fused = jax.jit(functools.partial(train_step, loss_name=config.train.loss),
                  donate_argnums=(0,), out_shardings=(replicated, replicated),
                  compiler_options=xla_options.options(config.model.dtype))
  mode = config.train.get('step_mode', 'fused')
  if mode == 'auto':
    mode = 'fused'
    if jax.default_backend() == 'cpu':
      # Compiled once here; the first call finds this executable in jit's cache.
      needed = staged_step.program_bytes(fused.lower(state, batch).compile())
      needed *= jax.local_device_count()  # CPU devices of a process share its memory
      available = staged_step.available_memory_bytes()
      if jax.process_count() > 1:  # every process must choose the same programs
        available_mib = multihost_utils.process_allgather(np.int32(available // 2**20))
        available = int(np.min(available_mib)) * 2**20
      if needed > staged_step.FUSED_MEMORY_FRACTION * available:
        mode = 'staged'
        report(f'train.step_mode=auto: the one-program step needs {needed / 2**30:.1f} GiB, '
               f'{available / 2**30:.1f} GiB are available: using the staged step (one '
               f'program per half residual block, ~1.5x the time, under half the memory)')
  if mode == 'staged':
    return staged_step.StagedTrainStep(model, config.train.loss, replicated)
  return fused


def eval_step(state, batch):
  """Inference-mode logits -> per-example loss, region counts and predicted classes."""
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                          batch['image'], train=False)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  per_voxel = -jnp.take_along_axis(log_probs, batch['label'][..., None], axis=-1)[..., 0]
  predicted = jnp.argmax(logits, axis=-1)
  return {'loss': jnp.mean(per_voxel, axis=(1, 2, 3)),
          'counts': metrics.region_counts(predicted, batch['label'])}


def make_eval_fn(config, replicated):
  """`eval_step` jitted for `config`'s model, its results placed by `replicated`."""
  return jax.jit(eval_step, out_shardings=replicated,
                 compiler_options=xla_options.options(config.model.dtype))


class _Sharder:
  """Places host batches on the mesh: each process contributes its local rows."""

  def __init__(self, mesh):
    self.data = NamedSharding(mesh, PartitionSpec('data'))
    self.replicated = NamedSharding(mesh, PartitionSpec())

  def abstract_batch(self, global_batch, image_size):
    """Shapes, dtypes and shardings of the global batches `batch` returns."""
    shape = (global_batch, *image_size)
    return {'image': jax.ShapeDtypeStruct((*shape, labels.NUM_CHANNELS), jnp.float32,
                                          sharding=self.data),
            'label': jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.data),
            'mask': jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=self.data)}

  def batch(self, host_batch):
    return {key: jax.make_array_from_process_local_data(self.data, host_batch[key])
            for key in input_pipeline.DEVICE_KEYS}


def resolve_source_dir(data_config):
  """The BraTS folder to train on: `data_dir`, or the synthetic cohort (generated if needed)."""
  if data_config.data_dir:
    return data_config.data_dir
  synthetic.ensure_cohort(data_config.synthetic_dir, data_config.synthetic_cases,
                          seed=data_config.synthetic_seed,
                          shape=tuple(data_config.synthetic_shape))
  return data_config.synthetic_dir


def prepare_dataset(data_config):
  """Validates the source (first time only) and returns the prepared TFDS builder.

  With several processes, process 0 prepares (or generates) and the others wait, then open the
  finished dataset (a shared file system is assumed for `data.prepared_dir`).
  """
  if jax.process_count() > 1:
    failure = None
    if is_main_process():
      try:
        _prepare_dataset(data_config)
      except Exception as err:  # noqa: BLE001 - re-raised below, after the barrier
        failure = err
    multihost_utils.sync_global_devices('aspp_resunet: dataset prepared')
    if failure is not None:
      raise failure
  return _prepare_dataset(data_config)


def _report_invalid_cases(errors, source_dir):
  """Prints every invalid case (one line each) and returns the one-line error to raise."""
  for err in errors:
    report(str(err))  # every bad case on its own line, as validate prints them
  return brats.DataDirError(
      f'{len(errors)} invalid case(s) in {source_dir}, listed above (first: {errors[0]}); '
      f'nothing was written: fix them, or set data.skip_invalid=True to leave them out')


def _prepare_dataset(data_config):
  source_dir = resolve_source_dir(data_config)
  excluded, validated = None, False
  if not os.path.exists(tfds_brats.manifest_path(data_config, source_dir)):
    # Validated before the split is made: nothing is written for a folder with bad cases,
    # unless data.skip_invalid leaves them out of the split.
    errors = tfds_brats.validate_cases(data_config, source_dir)
    if errors and not data_config.get('skip_invalid', False):
      raise _report_invalid_cases(errors, source_dir)
    excluded, validated = {err.case_id: str(err) for err in errors}, True
  builder = tfds_brats.builder_for(data_config, source_dir, excluded)
  if not os.path.isdir(builder.data_dir) and not validated:
    listed = {c for ids in builder.builder_config.splits.values() for c in ids}
    errors = tfds_brats.validate_cases(data_config, source_dir, listed)
    if errors:
      raise _report_invalid_cases(errors, source_dir)
  builder = tfds_brats.prepare(data_config, source_dir)
  skipped = tfds_brats.excluded_cases(data_config, source_dir)
  if skipped:
    report(f'{len(skipped)} invalid case(s) left out (data.skip_invalid):')
    for reason in skipped.values():
      report(f'  {reason}')
  return builder


def check_config(config):
  """Cheap checks before any heavy work, each a one-line TrainingError."""
  devices = jax.device_count()
  if config.train.batch_size < 1 or config.train.batch_size % devices:
    raise TrainingError(f'train.batch_size={config.train.batch_size} must be a positive multiple '
                        f'of the {devices} devices (each device takes an equal share)')
  if config.train.schedule not in SCHEDULES:
    raise TrainingError(f'train.schedule must be one of {SCHEDULES}, got '
                        f'{config.train.schedule!r}')
  if config.train.get('step_mode', 'fused') not in staged_step.STEP_MODES:
    raise TrainingError(f'train.step_mode must be one of {staged_step.STEP_MODES}, got '
                        f'{config.train.step_mode!r}')
  if config.train.loss not in losses.LOSSES:
    raise TrainingError(f'train.loss must be one of {losses.LOSSES}, got {config.train.loss!r}')
  factor = 2**(config.model.depth + 1)
  if any(int(s) % factor for s in config.data.image_size):
    raise TrainingError(f'data.image_size={tuple(config.data.image_size)} must be divisible by '
                        f'{factor} for model.depth={config.model.depth}')


def _validation(state, builder, sharder, eval_fn, eval_batch_size, split='validation'):
  """Mean loss and mean Dice per region (model resolution, SPEC 4 rules) over `split`."""
  if builder.info.splits[split].num_examples == 0:
    return {}
  losses_, counts = [], []
  for host_batch in input_pipeline.eval_batches(builder, split, eval_batch_size,
                                                jax.process_index(), jax.process_count()):
    out = jax.device_get(eval_fn(state, sharder.batch(host_batch)))
    valid = _gather_mask(host_batch['mask'], out['loss'].shape[0])
    losses_.append(out['loss'][valid])
    counts.append(out['counts'][valid])
  counts = np.concatenate(counts)
  dice = metrics.dice_from_counts(counts[..., 0], counts[..., 1], counts[..., 2])
  result = {f'dice_{region}': float(dice[:, i].mean())
            for i, region in enumerate(labels.REGION_NAMES)}
  result['dice_mean'] = float(np.mean([result[f'dice_{r}'] for r in labels.REGION_NAMES]))
  result['loss'] = float(np.concatenate(losses_).mean())
  return result


def _gather_mask(local_mask, global_rows):
  """The validity of every row of a global batch (all processes' local masks, in order)."""
  if jax.process_count() == 1:
    return local_mask > 0
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  gathered = multihost_utils.process_allgather(local_mask)
  return np.asarray(gathered).reshape(global_rows) > 0


class _MetricLog:
  """metrics.jsonl (one JSON object per line) plus TensorBoard scalars, process 0 only."""

  def __init__(self, workdir):
    self._path = os.path.join(workdir, METRICS_FILE)
    self._active = is_main_process()
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=not self._active, asynchronous=False)

  def truncate_after(self, step):
    """Drops records newer than a restored checkpoint, so a resumed log has no duplicates."""
    if not self._active or not os.path.exists(self._path):
      return
    with open(self._path) as stream:
      kept = [line for line in stream if line.strip() and json.loads(line)['step'] <= step]
    temp = self._path + '.tmp'
    with open(temp, 'w') as stream:
      stream.writelines(kept)
    os.replace(temp, self._path)

  def write(self, step, kind, epoch, scalars):
    if not self._active:
      return
    with open(self._path, 'a') as stream:
      stream.write(json.dumps({'step': step, 'epoch': epoch, 'kind': kind, **scalars}) + '\n')
    self._writer.write_scalars(step, {f'{kind}/{k}': v for k, v in scalars.items()})
    self._writer.flush()

  def close(self):
    self._writer.close()


def _save_config(config, workdir):
  if not is_main_process():
    return
  path = os.path.join(workdir, CONFIG_FILE)
  text = config.to_json_best_effort(indent=1, sort_keys=True)
  if os.path.exists(path):
    with open(path) as stream:
      if stream.read() != text:
        logging.warning('%s differs from the saved config of this workdir; the new one is used '
                        'and saved', path)
  with open(path + '.tmp', 'w') as stream:
    stream.write(text)
  os.replace(path + '.tmp', path)


def _record(epoch, step, validation, best):
  return {'epoch': epoch, 'step': step, 'validation': validation, 'best_dice_mean': best}


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, resuming from its newest checkpoint if there is one.

  Returns:
    A summary dict: final step, last and best validation metrics.

  Raises:
    TrainingError: a one-line reason training stopped (bad config, non-finite loss).
  """
  check_config(config)
  # The data is checked (and prepared) first: a folder with bad cases leaves the workdir as it was.
  builder = prepare_dataset(config.data)
  os.makedirs(workdir, exist_ok=True)
  _save_config(config, workdir)
  global_batch = config.train.batch_size
  steps_per_epoch = input_pipeline.steps_per_epoch(builder, global_batch)
  if steps_per_epoch == 0:
    raise TrainingError(f'{builder.info.splits["train"].num_examples} training cases are fewer '
                        f'than the batch size {global_batch}')
  total_steps = steps_per_epoch * config.train.num_epochs
  schedule = learning_rate_schedule(config.train, total_steps)
  mesh = make_mesh()
  sharder = _Sharder(mesh)
  eval_batch = math.ceil(config.train.eval_batch_size / jax.device_count()) * jax.device_count()

  model = models.create_model(config.model)
  # RngBitGenerator keys: XLA:CPU compiles the parameter initialisation in 2 s instead of 15 s
  # with threefry. Values are fixed by the seed on a given backend (not across CPU/GPU/TPU).
  state = create_train_state(config, model, jax.random.key(config.seed, impl='rbg'), total_steps)
  # Replicated over the global mesh before a restore, which takes its shardings from this
  # template: arrays restored onto one process's device cannot be moved across hosts.
  state = jax.device_put(state, sharder.replicated)
  checkpoints = checkpointing.Checkpoints(workdir, config.train.keep_checkpoints)
  restored = checkpoints.restore(checkpointing.LATEST, state)
  best = -1.0
  if restored is not None:
    state, record = restored
    best = record.get('best_dice_mean', -1.0)
    report(f'resuming from step {int(state.step)} (epoch {record["epoch"]})')
  step = int(state.step)
  log = _MetricLog(workdir)
  log.truncate_after(step)

  train_fn = make_train_fn(config, model, sharder.replicated, state,
                           sharder.abstract_batch(global_batch, config.data.image_size))
  eval_fn = make_eval_fn(config, sharder.replicated)
  last_validation = {}
  max_steps = config.train.max_steps if config.train.max_steps >= 0 else total_steps
  try:
    while step < min(total_steps, max_steps):
      epoch, offset = divmod(step, steps_per_epoch)
      batches = input_pipeline.train_batches(
          builder, config.data, global_batch, config.seed, epoch, skip_batches=offset,
          process_index=jax.process_index(), process_count=jax.process_count())
      progress = tqdm.tqdm(total=steps_per_epoch, initial=offset, desc=f'epoch {epoch + 1}/'
                           f'{config.train.num_epochs}', disable=not is_main_process(),
                           leave=False, dynamic_ncols=True)
      window_losses, window_started = [], time.time()
      for host_batch in batches:
        state, out = train_fn(state, sharder.batch(host_batch))
        loss = float(out['loss'])
        step += 1
        if not math.isfinite(loss):
          cases = ', '.join(c.decode() if isinstance(c, bytes) else str(c)
                            for c in host_batch['case_id'])
          raise TrainingError(
              f'non-finite training loss ({loss}) at step {step} (epoch {epoch + 1}), batch '
              f'cases: {cases}; stopped, the last good checkpoint '
              f'{checkpoints.steps(checkpointing.LATEST)[-1:] or "(none)"} is kept')
        window_losses.append(loss)
        progress.update(1)
        progress.set_postfix(loss=f'{loss:.4f}')
        if step % config.train.log_every_steps == 0 or step % steps_per_epoch == 0:
          seconds = (time.time() - window_started) / len(window_losses)
          log.write(step, 'train', epoch + 1, {
              'loss': float(np.mean(window_losses)), 'step_seconds': seconds,
              'volumes_per_second': global_batch / seconds,
              'learning_rate': float(schedule(step - 1) if callable(schedule) else schedule)})
          window_losses, window_started = [], time.time()
        if step >= max_steps and step % steps_per_epoch:
          checkpoints.save(checkpointing.LATEST, step, state,
                           _record(epoch, step, last_validation, best))
          break
      progress.close()
      if step % steps_per_epoch:
        break  # stopped by max_steps inside an epoch
      last_validation = _validation(state, builder, sharder, eval_fn, eval_batch)
      if last_validation:
        log.write(step, 'validation', epoch + 1, last_validation)
        report(f'epoch {epoch + 1}/{config.train.num_epochs}: validation ' +
               ', '.join(f'{k} {v:.4f}' for k, v in last_validation.items()))
      mean_dice = last_validation.get('dice_mean', -1.0)
      improved = mean_dice > best
      best = max(best, mean_dice)
      record = _record(epoch + 1, step, last_validation, best)
      if improved or not checkpoints.steps(checkpointing.BEST):
        checkpoints.save(checkpointing.BEST, step, state, record)
      checkpoints.save(checkpointing.LATEST, step, state, record)
  finally:
    log.close()
    checkpoints.close()
  return {'step': step, 'validation': last_validation, 'best_dice_mean': best,
          'state': state}
