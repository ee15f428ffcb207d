r"""Imports the Caffe model zoo's NiN as a workdir: `python -m nin_jax.caffe_import`.

  python -m nin_jax.caffe_import --caffemodel=nin_imagenet.caffemodel \
      --preset=imagenet --workdir=runs/nin_imagenet_caffe \
      [--mean_file=imagenet_mean.binaryproto] [--class_names=synset_words.txt]
  python -m nin_jax.caffe_import --caffemodel=cifar10_nin.caffemodel \
      --preset=cifar10 --workdir=runs/nin_cifar10_caffe \
      --dataset=npz:../shared/data/cifar10/cifar10.npz

Reads the file without Caffe, checks its layers against the preset and
writes a workdir (checkpoint, config, Caffe's input conventions) that
nin_jax.evaluate, predict and export use as they are; see caffe_zoo.py.
"""

from absl import app
from absl import flags

from nin_jax import caffe_zoo
from nin_jax import cli
from nin_jax import config_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('caffemodel', None, 'The .caffemodel file.')
flags.DEFINE_enum('preset', None, tuple(caffe_zoo.ZOO),
                  'The zoo model it holds.')
flags.DEFINE_string('workdir', None, 'The workdir to write (new).')
flags.DEFINE_string('mean_file', None, 'imagenet: Caffe mean image '
                    '(.binaryproto, BGR [1, 3, 256, 256]).')
flags.DEFINE_list('mean_pixel', list(map(str, caffe_zoo.CAFFE_MEAN_PIXEL)),
                  'imagenet: mean B,G,R pixel when no --mean_file.')
flags.DEFINE_string('class_names', None, 'A text file, one class name per '
                    'line (e.g. Caffe synset_words.txt); default: numbers '
                    '(cifar10: the dataset\'s names).')
flags.DEFINE_string('dataset', None, 'The dataset to evaluate on (and, for '
                    'cifar10, to fit the ZCA on); default: the zoo model\'s.')
flags.DEFINE_string('data_dir', '', 'TFDS data_dir for --dataset.')
flags.mark_flags_as_required(['caffemodel', 'preset', 'workdir'])


def main(argv):
  cli.check_no_arguments(argv)
  with cli.user_errors():
    try:
      mean_pixel = [float(v) for v in FLAGS.mean_pixel]
    except ValueError as e:
      raise config_lib.ConfigError(
          f'--mean_pixel={",".join(FLAGS.mean_pixel)}: {e}') from e
    caffe_zoo.import_caffemodel(
        FLAGS.caffemodel, FLAGS.preset, FLAGS.workdir, FLAGS.mean_file,
        mean_pixel, FLAGS.class_names, FLAGS.dataset, FLAGS.data_dir)
  print(f'Wrote {FLAGS.workdir}: evaluate with python -m nin_jax.evaluate '
        f'--workdir={FLAGS.workdir}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
