r"""Class confidence maps of a trained NiN: Figure 4 of Lin, Chen & Yan (2014).

  python -m experiments.confidence_maps --workdir=runs/quickstart --out=maps.png

For the first `--num_images` images of a split (the test split by default),
one row each: the image in the dataset's pixel units, then the feature map of
the last mlpconv layer for each class, the [h, w, classes] maps that global
average pooling reduces to the logits (each class's logit is the mean of its
map). Every map of the figure shares one colour scale (the colorbar). The
predicted class's title is bold (green if right, red if wrong), the true
class's title is green, and the row label names both. Models with more than
`--max_classes` classes show, per row, the highest-scoring classes (the true
class always among them).

The images go through the evaluation's own preprocessing
(`inference.eval_split`, the workdir's saved statistics); the maps are the
model's own intermediate, sown by `models.NiN` just before global average
pooling ('intermediates'/'class_maps'). A model with the fully connected head
(`model.head='fc'`) has no class maps: the script says so in one line.
Needs matplotlib (`pip install -e '.[plot]'`).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, NamedTuple, Optional, Sequence

# pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib
matplotlib.use('Agg')
from matplotlib import figure as mpl_figure
import matplotlib.pyplot as plt

import jax
import numpy as np

from nin_jax import cli
from nin_jax import config_lib
from nin_jax import datasets
from nin_jax import holdouts
from nin_jax import inference
from nin_jax import input_pipeline
from nin_jax import sources

MAX_CLASSES = 10   # Maps per row; more classes: the highest-scoring ones.
CELL_INCHES = 1.25  # Side of one image or map in the figure.
DPI = 100


class NoClassMapsError(config_lib.ConfigError):
  """The model has no class maps (the fully connected head)."""


class ClassMaps(NamedTuple):
  """Images of a split and what the model makes of them.

  `pixels`: [n, h, w, c] in the dataset's units (uint8, or 0..16 for digits);
  `labels`: [n] int; `logits`: [n, classes] float32; `maps`: [n, mh, mw,
  classes] float32, the GAP head's input (`logits` is its mean over mh, mw).
  """
  pixels: np.ndarray
  labels: np.ndarray
  logits: np.ndarray
  maps: np.ndarray


def class_maps_fn(trained: inference.TrainedModel
                  ) -> Callable[[Any, Any], tuple[jax.Array, jax.Array]]:
  """`fn(variables, inputs)` -> (logits [n, classes], class maps [n, h, w,
  classes]) of normalized inputs [n, height, width, channels], in one pass."""
  if trained.model.head != 'gap':
    raise NoClassMapsError(
        f'model.head={trained.model.head!r}: this model ends in a fully '
        f"connected layer, not global average pooling, so it has no class "
        f"confidence maps (only model.head='gap' models do).")
  model = trained.model

  def fn(variables: Any, inputs: Any) -> tuple[jax.Array, jax.Array]:
    if not variables.get('batch_stats'):
      variables = {'params': variables['params']}
    logits, state = model.apply(variables, inputs, train=False,
                                mutable=['intermediates'])
    maps, = state['intermediates']['class_maps']
    return logits, maps

  return fn


def _raw_split(c: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Unnormalized images [n, h, w, c] and labels [n] of an in-memory split,
  in the order `input_pipeline.load_split` gives them."""
  spec = datasets.lookup(c.data.dataset)
  if split == 'test':
    x, y, _ = sources.load_raw_test(c.data, spec)
    return x, y
  x_train, y_train, x_eval, y_eval, _ = holdouts.split_raw(
      c.data, spec, sources.load_raw(c.data, spec))
  return (x_train, y_train) if split == 'train' else (x_eval, y_eval)


def load_examples(trained: inference.TrainedModel, split: str,
                  num_images: int, **config_overrides: Any
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(pixels [n, h, w, c] as stored, model inputs [n, h, w, c] float32
  normalized as evaluation does, labels [n]) of the first `num_images` of
  `split` ('' the run's evaluation split). `config_overrides`: dataset,
  data_dir, if the data moved."""
  c = trained.config.copy_and_resolve_references()
  c.data.update(config_overrides)
  data, normalize = inference.eval_split(c, datasets.lookup(c.data.dataset),
                                         trained.inputs, split)
  indices = np.arange(min(num_images, len(data)))
  reader = data.open()
  try:
    batch = reader.read(indices, None)
  finally:
    reader.close()
  if normalize is not None:  # Streamed: raw crops, normalized on device.
    return (batch['image'], np.asarray(normalize(batch['image'])),
            batch['label'])
  # In memory: eval_split normalized the split on the host; show the same
  # rows before normalization.
  split = split or ('validation' if c.data.validation_split else 'test')
  pixels, labels = (a[indices] for a in _raw_split(c, split))
  if not np.array_equal(labels, batch['label']):
    raise input_pipeline.DataError(
        f'{c.data.dataset} {split}: the unnormalized split is not in the '
        f'order of the evaluated one (labels differ).')
  return pixels, batch['image'], batch['label']


def compute(trained: inference.TrainedModel, split: str = 'test',
            num_images: int = 4, **config_overrides: Any) -> ClassMaps:
  """The class maps of the first `num_images` images of `split`."""
  fn = class_maps_fn(trained)  # Fails before any data is read.
  pixels, inputs, labels = load_examples(trained, split, num_images,
                                         **config_overrides)
  logits, maps = jax.jit(fn)(trained.variables, inputs)
  return ClassMaps(pixels, np.asarray(labels),
                   np.asarray(logits, np.float32), np.asarray(maps, np.float32))


def shown_classes(logits: np.ndarray, label: int,
                  max_classes: int) -> list[int]:
  """The classes whose maps a row shows: all, in order, if there are at most
  `max_classes`; else the highest-scoring ones, the true `label` included."""
  if logits.shape[-1] <= max_classes:
    return list(range(logits.shape[-1]))
  top = [int(k) for k in np.argsort(-logits, kind='stable')[:max_classes]]
  if label not in top:
    top[-1] = label
  return top


def _show_pixels(ax: Any, pixels: np.ndarray, max_value: float) -> None:
  """Draws one image [h, w, c] in its own units: grayscale 0..max_value."""
  if pixels.shape[-1] == 1:
    ax.imshow(pixels[..., 0], cmap='gray', vmin=0, vmax=max_value,
              interpolation='nearest')
  else:
    ax.imshow(np.clip(pixels / np.float32(max_value), 0, 1),
              interpolation='nearest')


def _hide_ticks(ax: Any) -> None:
  ax.set_xticks([])
  ax.set_yticks([])


def plot(result: ClassMaps, class_names: Sequence[str], max_value: float,
         title: str = '', max_classes: int = MAX_CLASSES
         ) -> mpl_figure.Figure:
  """The figure: a row per image (image, then class maps on one shared
  colour scale with a colorbar); predicted and true classes marked."""
  n = len(result.labels)
  columns = min(result.logits.shape[-1], max_classes)
  rows = [shown_classes(result.logits[i], int(result.labels[i]), max_classes)
          for i in range(n)]
  shown = np.stack([result.maps[i][..., rows[i]] for i in range(n)])
  vmin, vmax = float(shown.min()), float(shown.max())
  fig, axes = plt.subplots(
      n, columns + 1, squeeze=False, layout='constrained',
      figsize=(CELL_INCHES * (columns + 1) + 1.2, CELL_INCHES * n + 0.6))
  image = None
  for i in range(n):
    label, predicted = int(result.labels[i]), int(result.logits[i].argmax())
    ax = axes[i, 0]
    _show_pixels(ax, result.pixels[i], max_value)
    _hide_ticks(ax)
    ax.set_ylabel(f'true: {class_names[label]}\n'
                  f'predicted: {class_names[predicted]}', fontsize=8)
    if i == 0:
      ax.set_title('input', fontsize=9)
    for j, k in enumerate(rows[i]):
      ax = axes[i, j + 1]
      image = ax.imshow(result.maps[i, :, :, k], cmap='viridis', vmin=vmin,
                        vmax=vmax, interpolation='nearest')
      _hide_ticks(ax)
      color = ('green' if k == label else
               'red' if k == predicted else 'black')
      ax.set_title(class_names[k], fontsize=9, color=color,
                   fontweight='bold' if k == predicted else 'normal')
  fig.colorbar(image, ax=axes[:, 1:].ravel().tolist(), shrink=0.9,
               label='class map (GAP input)')
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True,
                      help='a training (or caffe_import) workdir')
  parser.add_argument('--out', required=True, help='the PNG to write')
  parser.add_argument('--num_images', type=int, default=4,
                      help='rows: the first N images of the split')
  parser.add_argument('--step', type=int, default=None,
                      help='checkpoint step (default: the newest)')
  parser.add_argument('--split', default='test',
                      choices=('',) + input_pipeline.SPLITS,
                      help="'' is the split the run evaluated")
  parser.add_argument('--max_classes', type=int, default=MAX_CLASSES,
                      help='class maps per row (the highest-scoring ones '
                      'when the model has more classes)')
  parser.add_argument('--dataset', default=None,
                      help='overrides config.data.dataset (npz:PATH, tfds:NAME)')
  parser.add_argument('--data_dir', default=None,
                      help='overrides config.data.data_dir (TFDS)')
  args = parser.parse_args(argv)
  if args.num_images < 1 or args.max_classes < 1:
    parser.error('--num_images and --max_classes must be at least 1.')
  return args


def main(argv: Optional[list[str]] = None) -> None:
  args = parse_args(argv)
  overrides = {k: v for k, v in (('dataset', args.dataset),
                                 ('data_dir', args.data_dir)) if v is not None}
  with cli.user_errors():  # A user's mistake: one line, exit status 2.
    trained = inference.load(args.workdir, args.step)
    result = compute(trained, args.split, args.num_images, **overrides)
  source = inference.read_source(args.workdir)
  model = (f'{source}, imported' if source else
           f'{args.workdir}, step {trained.step}')
  fig = plot(result, trained.inputs.class_names, trained.inputs.fitted.max_value,
             f'{model}: class confidence maps '
             f'({args.split or "evaluation"} split)', args.max_classes)
  fig.savefig(args.out, dpi=DPI)
  plt.close(fig)
  print(f'confidence_maps: wrote {args.out}', flush=True)


if __name__ == '__main__':
  main()
