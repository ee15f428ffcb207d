r"""configs/mnist.py on the genuine MNIST in ../shared/data/mnist/mnist.npz.

  python -m experiments.train_mnist --workdir=runs/mnist_real --epochs=2

The full configuration (60 epochs) is the command without --epochs. The data
path is --npz=PATH or $NIN_JAX_DATA_DIR/mnist/mnist.npz. Trains with
`nin_jax.train.train_and_evaluate` and ends with one line: test error, steps,
wall time.
"""

from experiments import real_data_run

if __name__ == '__main__':
  real_data_run.run('mnist', 'mnist.py', 'mnist/mnist.npz', __doc__)
