"""The experiment scripts: run from the repository root as modules.

  python -m experiments.train_mnist --workdir=runs/mnist_real --epochs=2
  python -m experiments.race --framework=jax --minutes=1 --out=/tmp/race

Not part of the installed package (`nin_jax`): a package only so the scripts
import each other (`from experiments import paper_tables`) and the tests
import them without changing `sys.path`. Scripts that start others do so as
`python -m experiments.NAME` in the repository root, so they work from any
working directory.
"""
