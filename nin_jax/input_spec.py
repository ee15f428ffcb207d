"""What a trained model expects as input, saved in its workdir.

Training writes WORKDIR/preprocessing.json (method, pixel range, image shape,
crop, class names) and WORKDIR/preprocessing.npz (the fitted statistics:
per-channel mean and std, or the GCN + ZCA mean and matrix), so evaluation,
prediction and export (evaluate.py, predict.py, export.py) never refit or
reload training data and need nothing but the workdir. caffe_import.py writes
the same files for the Caffe model zoo's conventions.

Images enter as the dataset stores them: [height, width, channels] in the
dataset's pixel units (uint8 0..255; 0..16 for scikit-learn's digits).
"""

from __future__ import annotations

import dataclasses
import io
import json

import jax
import ml_collections
import numpy as np
from etils import epath

from nin_jax import input_pipeline
from nin_jax import preprocessing
from nin_jax import sources
from nin_jax import streaming
from nin_jax.errors import ConfigError

JSON_NAME = 'preprocessing.json'
ARRAYS_NAME = 'preprocessing.npz'
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """The input side of a trained model.

  `fitted`: the normalization (preprocessing.Fitted). `image_shape`: the
  model's input [height, width, channels]. `class_names`: one per class.
  An image file of another size is cropped to its central `crop_fraction`
  (of the shorter side if `square_crop`, else of each side) and resized to
  `image_shape` (see streaming.central_crop).
  """
  fitted: preprocessing.Fitted
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  crop_fraction: float = 1.0
  square_crop: bool = False

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def from_dataset(data: ml_collections.ConfigDict,
                 dataset: input_pipeline.Dataset) -> InputSpec:
  """The spec of a run on `dataset` (whose `fitted` holds the statistics);
  `data` is config.data."""
  crop = {}
  if dataset.spec.streamed:
    crop = dict(crop_fraction=streaming.EVAL_CROP_FRACTION, square_crop=True)
  return InputSpec(dataset.fitted, tuple(dataset.image_shape),
                   sources.class_names(data, dataset.spec,
                                       dataset.num_classes),
                   **crop)


def save(workdir: str, spec: InputSpec) -> None:
  """Writes the spec into `workdir` (process 0 only; any epath location)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, **spec.fitted.arrays)
  (path / ARRAYS_NAME).write_bytes(buffer.getvalue())
  settings = {
      'format': FORMAT_VERSION, 'method': spec.fitted.method,
      'max_value': spec.fitted.max_value,
      'image_shape': list(spec.image_shape),
      'class_names': list(spec.class_names),
      'crop_fraction': spec.crop_fraction, 'square_crop': spec.square_crop,
  }
  (path / JSON_NAME).write_text(json.dumps(settings, indent=2))


def load(workdir: str) -> InputSpec:
  """Reads the spec saved in `workdir`; ConfigError if there is none."""
  path = epath.Path(workdir)
  if not (path / JSON_NAME).exists():
    raise ConfigError(
        f'--workdir={workdir} has no {JSON_NAME}: nin_jax.main and '
        f'nin_jax.caffe_import write it before anything else, so this is not '
        f'a workdir they wrote (or it was damaged); train or import into a '
        f'new workdir.')
  settings = json.loads((path / JSON_NAME).read_text())
  with np.load(io.BytesIO((path / ARRAYS_NAME).read_bytes()),
               allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  return InputSpec(
      preprocessing.Fitted(settings['method'], settings['max_value'], arrays),
      tuple(settings['image_shape']), tuple(settings['class_names']),
      settings['crop_fraction'], settings['square_crop'])
