"""The paper's configuration: 3D ASPP-ResUNet on BraTS 2020 at 128^3 (paper sections 3-5).

Accelerators: the same file runs on GPU/TPU. There, raise `train.batch_size` to a multiple of the
device count (the global batch is split across devices), set `model.dtype='bfloat16'` (params stay
float32) and `model.remat=True` if activations do not fit; see configs/paper_gpu.py and
configs/paper_tpu.py.
"""

import ml_collections


def get_config():
  """Returns the paper configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # fixes initialisation, data split, data order and augmentation
  # BraTS-layout folder; '' = the synthetic cohort in data.synthetic_dir. One value with two
  # names: --config.data_dir=DIR and --config.data.data_dir=DIR set the same field.
  config.data_dir = ml_collections.FieldReference('')

  config.data = data = ml_collections.ConfigDict()
  data.data_dir = config.get_ref('data_dir')  # the same field as config.data_dir
  data.scheme = 'brats2020'  # file naming: 'brats2020' (labels 0,1,2,4) | 'brats2023' (0,1,2,3)
  data.synthetic_dir = 'data/synthetic'  # where the synthetic cohort is generated if needed
  data.synthetic_cases = 40  # cases generated for the synthetic cohort
  data.synthetic_shape = (240, 240, 155)  # synthetic volume shape (real BraTS: 240x240x155)
  data.synthetic_seed = 0  # synthetic cohort seed (each case depends on (seed, index) only)
  data.prepared_dir = 'data/prepared'  # TFDS root for preprocessed examples (built once)
  data.image_size = (128, 128, 128)  # model input size (paper: 128^3)
  data.normalization = 'minmax'  # 'minmax' per volume (paper) | 'zscore' inside the brain
  data.crop_to_brain = False  # crop to the brain's bounding box before resizing
  data.image_dtype = 'float16'  # storage dtype of prepared images ('float16' | 'float32')
  data.split_fractions = (0.75, 0.15, 0.10)  # train / validation / test, patient-level (paper)
  data.split_seed = 0  # split seed, separate from `seed` so that compared runs share a split
  data.augment = False  # random flips and intensity scale/shift (off in the paper)
  data.flip_axes = (0, 1, 2)  # axes flipped with probability 1/2 each when augmenting
  data.intensity_scale = 0.1  # multiply each channel by U(1 - s, 1 + s) when augmenting
  data.intensity_shift = 0.1  # add U(-s, s) to each channel when augmenting
  data.prefetch = 2  # batches prepared ahead of the training step
  data.skip_invalid = False  # leave invalid cases out of the split (listed) instead of stopping

  config.model = model = ml_collections.ConfigDict()
  model.num_classes = 4  # background, NCR/NET, ED, ET
  model.base_width = 64  # filters of the first encoder level (doubling per level)
  model.depth = 4  # encoder levels (64, 128, 256, 512)
  model.bridge_width = 1024  # filters of the bridge block at 8^3
  model.use_aspp = True  # ASPP on the bridge (False: the Res-UNet baseline)
  model.aspp_features = 256  # filters per ASPP branch and of its projection
  model.aspp_rates = (6, 12, 18)  # dilation rates of the three atrous branches (paper)
  model.aspp_pool_norm = 'none'  # 'none' (default, see SPEC 2) | 'batch' (paper's form)
  model.upsampling = 'nearest'  # decoder x2 upsampling: 'nearest' | 'transpose'
  model.norm = 'batch'  # 'batch' (paper) | 'group' | 'instance'
  model.bn_momentum = 0.99  # BatchNorm running-average momentum (Keras default, the paper's)
  model.dtype = 'float32'  # compute dtype: 'float32' | 'bfloat16' (params stay float32)
  model.remat = False  # recompute residual-block activations in the backward pass
  # 'auto' (CPU: per layer, see layers.py; else 'lax') | 'lax' | 'depth2d' | 'im2col' | 'hybrid'
  model.conv_impl = 'auto'

  config.train = train = ml_collections.ConfigDict()
  train.num_epochs = 120  # paper
  train.batch_size = 1  # global batch across all devices and hosts (paper: 1)
  train.optimizer = 'adam'  # optax optimizer (paper: Adam)
  train.learning_rate = 1e-4  # peak learning rate (paper: 1e-4, constant)
  train.schedule = 'constant'  # 'constant' (paper) | 'cosine' (warm-up, cosine decay to 0)
  train.warmup_steps = 0  # linear warm-up steps of the 'cosine' schedule
  train.loss = 'ce'  # 'ce' (paper, no class weights) | 'dice' (soft Dice) | 'ce_dice'
  train.eval_batch_size = 1  # validation batch (padded to a multiple of the device count)
  train.keep_checkpoints = 3  # latest checkpoints kept besides the best one
  train.log_every_steps = 10  # TensorBoard/metrics.jsonl training scalars every N steps
  # 'fused': the training step is one compiled program; 'staged': one per half residual block,
  # each recomputing its forward in its backward (half the memory, ~1.5x the time on CPU);
  # 'auto': 'staged' only on CPU when the fused step would not fit in the available memory.
  train.step_mode = 'auto'
  train.max_steps = -1  # stop after this many steps (-1: num_epochs); for tests and timing

  config.eval = evaluation = ml_collections.ConfigDict()
  evaluation.checkpoint = 'best'  # 'best' (by mean validation Dice) | 'latest'
  evaluation.hd95 = 'pooled'  # 'pooled' (medpy hd95) | 'max_directed'
  evaluation.mode = 'whole'  # 'whole' volume (paper) | 'sliding_window' (patch-trained models)
  evaluation.window = ()  # sliding-window size; () = data.image_size
  evaluation.overlap = 0.5  # sliding-window overlap fraction
  evaluation.mirror = False  # test-time augmentation: average over the 8 axis flips
  evaluation.bootstrap_seed = 0  # seed of the paired bootstrap CI
  return config
