"""The house: module dependencies flow one way, and the dataset registry is
the one place that knows datasets."""

import ast
import pathlib

import pytest

from nin_jax import config_lib
from nin_jax import datasets
from nin_jax import errors
from nin_jax import validation

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'nin_jax'


def imports(path: pathlib.Path) -> set[str]:
  """The nin_jax modules `path` imports anywhere (function bodies too)."""
  modules = {p.stem for p in PACKAGE.glob('*.py')}
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module == 'nin_jax':
      found |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith(
        'nin_jax.'):
      found.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      found |= {a.name.split('.')[1] for a in node.names
                if a.name.startswith('nin_jax.')}
  return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
  """Module -> the nin_jax modules it imports; a subpackage (plugins) is one
  node, importing what any of its files imports."""
  graph = {p.stem: imports(p) for p in PACKAGE.glob('*.py')}
  for package in (p for p in PACKAGE.iterdir()
                  if p.is_dir() and (p / '__init__.py').exists()):
    graph[package.name] = set().union(
        *(imports(f) for f in package.rglob('*.py'))) - {package.name}
  return graph


def test_plugins_import_nothing_of_nin_jax():
  assert import_graph()['plugins'] == set()


def test_import_graph_has_no_cycle():
  graph = import_graph()
  state = {}

  def visit(module, path):
    if state.get(module) == 'done':
      return
    assert state.get(module) != 'open', ' -> '.join(path + [module])
    state[module] = 'open'
    for dep in sorted(graph.get(module, ())):
      visit(dep, path + [module])
    state[module] = 'done'

  for module in sorted(graph):
    visit(module, [])


def test_imports_are_seen_inside_functions(tmp_path):
  """The cycle check counts lazy imports: it would see this one."""
  path = tmp_path / 'lazy.py'
  path.write_text('def f():\n  from nin_jax import train\n  import '
                  'nin_jax.models\n')
  assert imports(path) == {'train', 'models'}


@pytest.mark.parametrize('module,allowed', [
    ('errors', set()),
    ('datasets', {'errors'}),
    ('readers', {'errors'}),
    ('tfds_source', {'datasets', 'errors'}),
    ('streaming', {'datasets', 'errors', 'tfds_source'}),
    ('sources', {'datasets', 'errors', 'readers', 'tfds_source'}),
    ('holdouts', {'datasets', 'errors', 'sources'}),
    ('batching', {'streaming'}),
    ('augmentation', {'datasets'}),
    ('input_pipeline', {'augmentation', 'batching', 'datasets', 'errors',
                        'holdouts', 'preprocessing', 'sources', 'streaming'}),
    ('layers', set()),
    ('models', {'layers'}),
    ('model_factory', {'conv_select', 'errors', 'models'}),
    ('hooks', {'checkpoints', 'errors', 'metric_writers'}),
])
def test_data_modules_depend_only_on_what_is_below_them(module, allowed):
  assert imports(PACKAGE / f'{module}.py') <= allowed


def test_lookup_answers_every_question_about_a_dataset():
  digits = datasets.lookup('sklearn:digits')
  assert (digits.flip, digits.streamed, digits.max_value) == (False, False,
                                                              16.0)
  imagenet = datasets.lookup('tfds:imagenet2012:5.1.0')
  assert imagenet.streamed and imagenet.eval_split == 'validation'
  assert imagenet.num_classes == 1000 and len(imagenet.mean) == 3
  svhn = datasets.lookup('tfds:svhn_cropped')
  assert svhn.extra_splits == ('extra',) and svhn.holdout == 'per_class'
  assert not svhn.flip
  assert datasets.lookup('tfds:cifar10').class_names[0] == 'airplane'
  assert datasets.lookup('tfds:cifar10').flip


def test_npz_files_named_after_a_dataset_take_its_properties():
  mnist = datasets.lookup('npz:/data/mnist.npz')
  assert (mnist.key, mnist.flip, mnist.name) == ('mnist', False,
                                                 '/data/mnist.npz')
  svhn = datasets.lookup('npz:~/svhn.npz')
  assert svhn.holdout == 'per_class' and svhn.extra_splits == ()
  assert datasets.lookup('npz:cifar10.npz').class_names[9] == 'truck'
  # Any other name is a generic dataset: flips allowed, classes numbered;
  # a name merely containing 'mnist' is not MNIST.
  for name in ('npz:/data/fashion_mnist.npz', 'npz:digits.npz',
               'npz:imagenet.npz'):
    spec = datasets.lookup(name)
    assert (spec.key, spec.flip, spec.class_names, spec.streamed) == (
        '', True, (), False), name


@pytest.mark.parametrize('bad', ['cifar10', 'tfds:', 'tfds:fashion_mnist',
                                 'sklearn:iris', 'hdf5:x.h5', ':x'])
def test_unknown_datasets_are_config_errors_naming_the_field(bad):
  with pytest.raises(errors.ConfigError, match=r'config\.data\.dataset='):
    datasets.lookup(bad)
  c = config_lib.default_config()
  c.data.dataset = bad
  with pytest.raises(config_lib.ConfigError, match=r'config\.data\.dataset='):
    validation.validate_config(c)
