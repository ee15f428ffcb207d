r"""configs/cifar10.py (GCN + ZCA, no augmentation) on the genuine CIFAR-10 in
../shared/data/cifar10/cifar10.npz.

  python -m experiments.train_cifar10 --workdir=runs/cifar10_real --epochs=1

The full configuration (160 epochs, the paper's Table 1 row) is the command
without --epochs. The data path is --npz=PATH or
$NIN_JAX_DATA_DIR/cifar10/cifar10.npz. Trains with
`nin_jax.train.train_and_evaluate` and ends with one line: test error, steps,
wall time.
"""

from experiments import real_data_run

if __name__ == '__main__':
  real_data_run.run('cifar10', 'cifar10.py', 'cifar10/cifar10.npz', __doc__)
