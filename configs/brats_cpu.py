"""Real BraTS on a 2-core CPU in under an hour: the ASPP-ResUNet, narrow, at 80^3 on the brain.

python train.py --config=configs/brats_cpu.py --config.data_dir=/path/to/BraTS --workdir=runs/cpu
Developed on 22 BraTS 2018 cases (16 train / 6 validation); figures in the README.
"""

from configs import default


def get_config():
  """Returns the CPU recipe for a small real BraTS folder."""
  config = default.get_config()
  config.data.image_size = (80, 80, 80)  # ~2 mm voxels over the brain's bounding box
  config.data.crop_to_brain = True  # spend the voxels on the brain, not the background
  config.data.normalization = 'zscore'  # robust to scanner intensity ranges (minmax is not)
  config.data.split_fractions = (0.75, 0.25, 0.0)  # a small folder: no test split of its own
  config.data.augment = True  # flips and intensity jitter: 16 cases are few
  config.model.base_width = 8  # 8, 16, 32 filters (paper: 64, 128, 256, 512)
  config.model.depth = 3  # 80^3 -> bridge at 5^3
  config.model.bridge_width = 64  # base_width * 2^depth, as the paper's 64 -> 1024
  config.model.aspp_features = 32  # paper: 256 with width 64
  config.model.aspp_rates = (1, 2, 3)  # the paper's 6/12/18 on 8^3, rescaled to a 5^3 bridge
  config.model.bn_momentum = 0.9  # running statistics that settle within a short run
  config.train.num_epochs = 80  # 1,280 steps of ~1.75 s: ~42 minutes on 2 CPU cores
  config.train.learning_rate = 3e-3  # peak of the cosine schedule
  config.train.schedule = 'cosine'  # decay to 0 over the run
  config.train.warmup_steps = 50  # warm-up steps
  config.train.loss = 'ce_dice'  # Dice term for the small tumour regions
  config.train.log_every_steps = 20  # train scalars every N steps
  # With the cosine decay the last checkpoint is the finished model; choosing the best epoch on
  # 6 validation cases would only fit noise (and make the validation Dice optimistic).
  config.eval.checkpoint = 'latest'
  return config
