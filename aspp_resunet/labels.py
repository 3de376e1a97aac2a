"""BraTS label conventions, model classes, evaluation regions, modality order, naming schemes."""

import dataclasses

import numpy as np

# Model classes (the network's softmax channels).
BACKGROUND = 0
NECROTIC_CORE = 1  # NCR/NET
EDEMA = 2  # ED
ENHANCING_TUMOR = 3  # ET
NUM_CLASSES = 4
CLASS_NAMES = ('background', 'necrotic_core', 'edema', 'enhancing_tumor')

# Evaluation regions as sets of model classes (BraTS convention).
REGIONS = {
    'wt': (NECROTIC_CORE, EDEMA, ENHANCING_TUMOR),  # whole tumour
    'tc': (NECROTIC_CORE, ENHANCING_TUMOR),  # tumour core
    'et': (ENHANCING_TUMOR,),  # enhancing tumour
}
REGION_NAMES = tuple(REGIONS)

# Channel order of the network input, as in the paper.
MODALITIES = ('t1', 't1ce', 't2', 'flair')
SEGMENTATION = 'seg'
NUM_CHANNELS = len(MODALITIES)


@dataclasses.dataclass(frozen=True)
class NamingScheme:
  """How one BraTS release names its files and labels."""

  name: str
  separator: str  # between the case id and the suffix
  suffixes: dict  # canonical key (MODALITIES + SEGMENTATION) -> file suffix
  enhancing_label: int  # the file label of enhancing tumour

  @property
  def file_labels(self):
    """Label values a segmentation file of this scheme may contain."""
    return (0, NECROTIC_CORE, EDEMA, self.enhancing_label)

  def class_to_label_lut(self):
    """uint8 lookup table: model class -> file label."""
    return np.asarray(self.file_labels, dtype=np.uint8)

  def label_to_class_lut(self):
    """uint8 lookup table over 0..max label: file label -> model class (255 = not a label)."""
    lut = np.full(max(self.file_labels) + 1, 255, dtype=np.uint8)
    for model_class, label in enumerate(self.file_labels):
      lut[label] = model_class
    return lut


SCHEMES = {
    'brats2020': NamingScheme(
        name='brats2020', separator='_',
        suffixes={'t1': 't1', 't1ce': 't1ce', 't2': 't2', 'flair': 'flair', 'seg': 'seg'},
        enhancing_label=4),
    'brats2023': NamingScheme(
        name='brats2023', separator='-',
        suffixes={'t1': 't1n', 't1ce': 't1c', 't2': 't2w', 'flair': 't2f', 'seg': 'seg'},
        enhancing_label=3),
}
DEFAULT_SCHEME = 'brats2020'


def get_scheme(name):
  """Returns the NamingScheme called `name`, or raises ValueError listing the known ones."""
  if name not in SCHEMES:
    raise ValueError(f'unknown naming scheme {name!r}; known: {", ".join(SCHEMES)}')
  return SCHEMES[name]


def labels_to_classes(labels, scheme):
  """Maps a segmentation of file labels to model classes (uint8).

  Raises ValueError if a value is not one of the scheme's labels.
  """
  labels = np.asarray(labels)
  lut = scheme.label_to_class_lut()
  if labels.dtype.kind == 'f':
    if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
      raise ValueError(f'labels outside {scheme.file_labels}')
    labels = labels.astype(np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= lut.size):
    raise ValueError(f'labels outside {scheme.file_labels}')
  classes = lut[labels]
  if (classes == 255).any():
    raise ValueError(f'labels outside {scheme.file_labels}')
  return classes


def classes_to_labels(classes, scheme):
  """Maps model classes to the scheme's file labels (uint8)."""
  return scheme.class_to_label_lut()[np.asarray(classes)]


def region_mask(classes, region):
  """Boolean mask of a region ('wt', 'tc', 'et') in a class map (numpy or jax array)."""
  members = REGIONS[region]
  mask = classes == members[0]
  for member in members[1:]:
    mask = mask | (classes == member)
  return mask
