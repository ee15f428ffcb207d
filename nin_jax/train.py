"""Training and evaluation of NiN: the state, the compiled steps and the loop.

The loop is data parallel over every device of every process: one `Mesh` with
a 'data' axis, the batch sharded along it, parameters and optimizer state
replicated, and one `jax.jit`-compiled step. The same code runs on one CPU,
several GPUs or a TPU slice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nin_jax import augmentation
from nin_jax import batching
from nin_jax import checkpoints
from nin_jax import config_lib
from nin_jax import datasets
from nin_jax import hooks
from nin_jax import input_pipeline
from nin_jax import input_spec
from nin_jax import metric_writers
from nin_jax import model_factory
from nin_jax import models
from nin_jax import optimizer as optimizer_lib
from nin_jax import preprocessing
from nin_jax import validation

DATA_AXIS = 'data'
TOP_K = 5  # Top-5 accuracy is reported for more than TOP_K classes.


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue: saved whole in each checkpoint."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # uint32 key data of the run's base PRNG key.


def create_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D mesh over all (global) devices with axis 'data'."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def init_variables(model: models.NiN, image_shape: tuple[int, ...],
                   seed: int) -> dict[str, Any]:
  """Initial variables for images of `image_shape` [height, width, channels]."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  return model.init({'params': jax.random.key(seed)}, dummy, train=False)


def create_train_state(model: models.NiN, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], seed: int) -> TrainState:
  variables = init_variables(model, image_shape, seed)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      rng=jax.random.key_data(jax.random.key(seed)))


def _variables(params: Any, batch_stats: Any) -> dict[str, Any]:
  """The model's variables; 'batch_stats' only for a model with BatchNorm."""
  return ({'params': params, 'batch_stats': batch_stats} if batch_stats
          else {'params': params})


def _apply_train(model, params, batch_stats, images, rng):
  return model.apply(_variables(params, batch_stats), images, train=True,
                     rngs={'dropout': rng},
                     mutable=['batch_stats'] if batch_stats else [])


def eval_logits(model: models.NiN, variables: dict[str, Any],
                images: jax.Array, flip: bool = False) -> jax.Array:
  """Logits [batch, classes] of images [batch, height, width, channels] in
  inference mode; with `flip`, the mean of the image's and its mirror's."""
  logits = model.apply(variables, images, train=False)
  if flip:
    logits = (logits + model.apply(variables, images[:, :, ::-1],
                                   train=False)) / 2
  return logits


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               model: models.NiN, tx: optax.GradientTransformation,
               schedule: optimizer_lib.Schedule, augment_fn: Optional[Callable],
               plateau: bool, label_smoothing: float = 0.0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on a global batch {'image': [batch, h, w, c], 'label':
  [batch]}.

  Dropout and augmentation keys are folded from (run key, step), so a run is
  reproducible and independent of the device count. `label_smoothing` a: the
  loss is the cross-entropy against (1 - a) one-hot + a / classes.
  """
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                state.step)
  dropout_key, augment_key = jax.random.split(step_key)
  images, labels = batch['image'], batch['label']
  if augment_fn is not None:
    images = augment_fn(images, augment_key)

  def loss_fn(params):
    logits, updates = _apply_train(model, params, state.batch_stats, images,
                                   dropout_key)
    if label_smoothing:
      targets = optax.smooth_labels(
          jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
    else:
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  extra = {'value': 1.0 - accuracy} if plateau else {}
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                       **extra)
  grad_norm = optax.tree.norm(grads)
  params = optax.apply_updates(state.params, param_updates)
  batch_stats = updates.get('batch_stats', state.batch_stats)
  # A finite gradient can still overflow the parameters, the momentum or the
  # BatchNorm statistics, so the new state itself is checked too.
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(
      (params, batch_stats, optimizer_lib.without_plateau_state(opt_state))))
  # A non-finite step leaves params, statistics and optimizer state as they
  # were, so nothing non-finite can reach a checkpoint.
  keep_if_bad = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep_if_bad(params, state.params),
      batch_stats=keep_if_bad(batch_stats, state.batch_stats),
      opt_state=keep_if_bad(opt_state, state.opt_state))
  metrics = {
      'loss': loss, 'accuracy': accuracy, 'grad_norm': grad_norm,
      'logit_spread': jnp.mean(jnp.max(logits, -1) - jnp.min(logits, -1)),
      'learning_rate': optimizer_lib.current_learning_rate(
          schedule, state.opt_state, state.step),
      'finite': finite,
  }
  return new_state, metrics


def all_finite(tree: Any) -> jax.Array:
  """True iff every element of every floating-point leaf of `tree` is finite."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              model: models.NiN, flip: bool = False) -> dict[str, jax.Array]:
  """Sums of loss and correct predictions (top-1, and top-5 for more than 5
  classes) over the rows of a batch {'image', 'label', 'mask'} whose mask is
  True; with `flip`, of the logits averaged with the mirror image's."""
  images, labels, mask = batch['image'], batch['label'], batch['mask']
  logits = eval_logits(model, _variables(state.params, state.batch_stats),
                       images, flip)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.argmax(logits, -1) == labels
  sums = {'loss_sum': jnp.sum(jnp.where(mask, losses, 0.0)),
          'correct': jnp.sum(jnp.where(mask, correct, 0)),
          'count': jnp.sum(mask)}
  if logits.shape[-1] > TOP_K:
    in_top_k = jnp.any(jax.lax.top_k(logits, TOP_K)[1] == labels[:, None], -1)
    sums['top5_correct'] = jnp.sum(jnp.where(mask, in_top_k, 0))
  return sums


def evaluate(eval_fn: Callable, state: TrainState,
             batches: batching.Batches) -> dict[str, float]:
  """Loss, accuracy (and top-5 accuracy) and error over `batches` (an
  evaluation split, each example once); closes `batches`."""
  totals = None
  with contextlib.closing(batches):
    for batch in batches:
      sums = eval_fn(state, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = int(totals['count'])
  accuracy = float(totals['correct']) / count
  metrics = {'loss': float(totals['loss_sum']) / count, 'accuracy': accuracy}
  if 'top5_correct' in totals:
    metrics['top5_accuracy'] = float(totals['top5_correct']) / count
  return {**metrics, 'error': 1.0 - accuracy, 'examples': count}


def compile_steps(c: ml_collections.ConfigDict, model: models.NiN,
                  tx: optax.GradientTransformation,
                  schedule: optimizer_lib.Schedule, mesh: Mesh,
                  state_sharding: Any, normalize_fn: Optional[Callable] = None,
                  augment_fn: Optional[Callable] = None
                  ) -> tuple[Callable, Callable]:
  """The jitted train and eval steps, batch sharded over 'data'.

  `normalize_fn` (a streamed dataset's uint8 batches) runs first in both
  steps, `augment_fn` (images, key) in the train step.
  """
  data = NamedSharding(mesh, P(DATA_AXIS))
  train_fn = jax.jit(
      _under_mesh(mesh, _normalize_first(functools.partial(
          train_step, model=model, tx=tx, schedule=schedule,
          augment_fn=augment_fn,
          plateau=c.optim.schedule == 'plateau',
          label_smoothing=c.train.label_smoothing), normalize_fn)),
      in_shardings=(state_sharding, data),
      out_shardings=(state_sharding, NamedSharding(mesh, P())),
      donate_argnums=(0,))
  return train_fn, compile_eval_step(model, mesh, state_sharding,
                                     normalize_fn, c.train.eval_flip)


def compile_eval_step(model: models.NiN, mesh: Mesh, state_sharding: Any,
                      normalize_fn: Optional[Callable] = None,
                      flip: bool = False) -> Callable:
  """The jitted eval step, batch sharded over 'data', fed
  `normalize_fn(images)` when given; `flip`: test-time mirror averaging."""
  data = NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(
      _under_mesh(mesh, _normalize_first(
          functools.partial(eval_step, model=model, flip=flip),
          normalize_fn)),
      in_shardings=(state_sharding, data),
      out_shardings=NamedSharding(mesh, P()))


def _under_mesh(mesh: Mesh, step_fn: Callable) -> Callable:
  """`step_fn` traced with `mesh` as the abstract mesh, so per-device kernels
  (nin_jax.plugins.onednn) know how the batch is split."""
  @functools.wraps(step_fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return step_fn(*args, **kwargs)
  return wrapped


def _normalize_first(step_fn: Callable,
                     normalize_fn: Optional[Callable]) -> Callable:
  """`step_fn(state, batch)` fed the batch with `normalize_fn(batch['image'])`
  (if any)."""
  if normalize_fn is None:
    return step_fn
  return lambda state, batch: step_fn(
      state, {**batch, 'image': normalize_fn(batch['image'])})


def num_train_steps(c: ml_collections.ConfigDict, num_examples: int) -> int:
  if c.train.num_train_steps > 0:
    return c.train.num_train_steps
  return max(1, int(math.ceil(
      c.train.num_epochs * batching.steps_per_epoch(num_examples,
                                                    c.train.batch_size))))


def write_config(c: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / 'config.json').write_text(c.to_json(indent=2, sort_keys=True))


@dataclasses.dataclass(frozen=True)
class Trainer:
  """The compiled pieces of a run: model, optimizer, initial state, steps."""
  model: models.NiN
  tx: optax.GradientTransformation
  schedule: optimizer_lib.Schedule
  state: TrainState
  train_fn: Callable  # (state, images, labels) -> (state, metrics)
  eval_fn: Callable   # (state, images, labels, mask) -> sums
  mesh: Mesh
  data_sharding: NamedSharding
  steps_per_epoch: int
  total_steps: int


def create_trainer(c: ml_collections.ConfigDict,
                   image_shape: tuple[int, int, int], num_train_examples: int,
                   mesh: Optional[Mesh] = None,
                   spec: Optional[datasets.DatasetSpec] = None,
                   fitted: Optional[preprocessing.Fitted] = None) -> Trainer:
  """Builds the model, optimizer, replicated initial state and jitted steps.

  `image_shape` [height, width, channels] of the (preprocessed) inputs.
  `spec` and `fitted`: c.data.dataset's registry entry and normalization, as
  the loaded dataset has them (resolved here when not given); a streamed
  dataset's batches are normalized with `fitted` on device.
  """
  mesh = create_mesh() if mesh is None else mesh
  spec = datasets.lookup(c.data.dataset) if spec is None else spec
  normalize_fn = None
  if spec.streamed:
    normalize_fn = preprocessing.normalizer(
        fitted or input_pipeline.streamed_fitted(c.data, spec))
  replicated = NamedSharding(mesh, P())
  model = model_factory.build_model(c.model)
  per_epoch = batching.steps_per_epoch(num_train_examples, c.train.batch_size)
  total_steps = num_train_steps(c, num_train_examples)
  params_shape = jax.eval_shape(
      lambda: init_variables(model, image_shape, c.train.seed))['params']
  tx, schedule = optimizer_lib.create_optimizer(c.optim, params_shape,
                                                per_epoch, total_steps)
  state = jax.jit(functools.partial(create_train_state, model, tx,
                                    tuple(image_shape)),
                  static_argnums=0, out_shardings=replicated)(c.train.seed)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  train_fn, eval_fn = compile_steps(
      c, model, tx, schedule, mesh, state_sharding, normalize_fn,
      augmentation.device_augment_fn(c.data, spec))
  return Trainer(model, tx, schedule, state, train_fn, eval_fn, mesh,
                 NamedSharding(mesh, P(DATA_AXIS)), per_epoch, total_steps)


def prepare(c: ml_collections.ConfigDict, workdir: str,
            spec: Optional[datasets.DatasetSpec] = None
            ) -> input_pipeline.Dataset:
  """Checks `c` and `workdir` and opens the dataset: every user error is
  raised here, before anything is compiled or written. `spec`: what
  validation.validate_config(c) returned, if it already ran (then only the
  checks that need the devices run again)."""
  if spec is None:
    spec = validation.validate_config(c, jax.device_count(),
                                      jax.default_backend())
  else:
    validation.check_platform(c, jax.device_count(), jax.default_backend())
  config_lib.check_workdir(workdir)
  validation.check_resume_compatible(c, workdir)
  dataset = input_pipeline.load_dataset(
      c.data, spec, models.PRESETS[c.model.preset].num_classes,
      config_lib.streamed_image_size(c))
  config_lib.check_image_size(c, spec, *dataset.image_shape)
  config_lib.check_batch_size(c, len(dataset.train))
  config_lib.check_schedule_length(
      c, batching.steps_per_epoch(len(dataset.train), c.train.batch_size))
  if c.train.init_from and not checkpoints.checkpoint_steps(workdir):
    shapes = jax.eval_shape(lambda: init_variables(
        model_factory.build_model(c.model), dataset.image_shape, c.train.seed))
    checkpoints.check_init_from(c.train.init_from, shapes['params'],
                                shapes.get('batch_stats', {}))
  return dataset


def start_from(state: TrainState, spec: str) -> TrainState:
  """`state` with the parameters and BatchNorm statistics of the checkpoint
  config.train.init_from names, placed as `state`'s own (any mesh, any
  number of processes); its step, optimizer and PRNG key stay fresh."""
  step, weights = checkpoints.read_init_from(spec)

  def place(saved: Any, like: jax.Array) -> jax.Array:
    saved = np.asarray(saved, like.dtype)
    return jax.make_array_from_callback(like.shape, like.sharding,
                                        lambda index: saved[index])

  state = state.replace(
      params=jax.tree.map(place, weights['params'], state.params),
      batch_stats=jax.tree.map(place, weights['batch_stats'],
                               state.batch_stats))
  logging.info('Starting from the parameters of %s (its step %d).', spec,
               step)
  return state


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str,
                       spec: Optional[datasets.DatasetSpec] = None
                       ) -> dict[str, Any]:
  """Trains `c` in `workdir`, resuming from its newest checkpoint.

  Returns the final evaluation metrics (and 'step'). Raises ConfigError for an
  invalid config before anything is compiled or written, NonFiniteError when
  the loss or gradient stops being finite. `spec`: as for `prepare`.
  """
  dataset = prepare(c, workdir, spec)
  trainer = create_trainer(c, dataset.image_shape, len(dataset.train),
                           spec=dataset.spec, fitted=dataset.fitted)
  pipeline = input_pipeline.Pipeline(dataset, c.train.seed, c.train.batch_size,
                                     c.train.eval_batch_size,
                                     trainer.data_sharding)
  write_config(c, workdir)
  input_spec.save(workdir, input_spec.from_dataset(c.data, dataset))
  manager = checkpoints.create_manager(workdir, c.train.keep_checkpoints)
  restored_step, state = checkpoints.restore_latest(manager, trainer.state)
  if restored_step is not None:
    logging.info('Resumed from the checkpoint at step %d.', restored_step)
    if c.train.init_from:
      logging.info('config.train.init_from is not used: this run resumes.')
  elif c.train.init_from:
    state = start_from(state, c.train.init_from)
  step = start_step = int(state.step)
  total_steps = trainer.total_steps
  logging.info('Training %s (%d params) on %d device(s) for %d steps '
               '(%d per epoch) from step %d.', c.model.preset,
               sum(x.size for x in jax.tree.leaves(state.params)),
               jax.device_count(), total_steps, trainer.steps_per_epoch,
               start_step)

  logged = [r for r in metric_writers.read_metrics(workdir)
            if r['step'] <= start_step]
  trained_seconds = max([r.get('train_seconds', 0.0) for r in logged
                         if r['split'] == 'train'] or [0.0])
  writer = metric_writers.MetricWriter(workdir, resume_step=start_step)
  log = hooks.TrainLog(c, writer, trainer.steps_per_epoch, total_steps,
                       models.PRESETS[c.model.preset].num_classes,
                       trained_seconds)
  save = hooks.CheckpointHook(manager, restored_step, before_save=writer.flush)
  profiler = hooks.Profiler(workdir, c.train.profile_steps, start_step)
  eval_every = c.train.eval_every_steps or trainer.steps_per_epoch
  save_every = c.train.checkpoint_every_steps or trainer.steps_per_epoch

  def evaluate_at(step: int, log: bool = True) -> dict[str, Any]:
    metrics = evaluate(trainer.eval_fn, state, pipeline.eval_iter())
    if log:
      writer.write(step, dataset.eval_name, metrics)
    top5 = (f' top-5 {metrics["top5_accuracy"]:.4f}'
            if 'top5_accuracy' in metrics else '')
    logging.info('step %d %s: loss %.4f accuracy %.4f%s error %.4f', step,
                 dataset.eval_name, metrics['loss'], metrics['accuracy'],
                 top5, metrics['error'])
    return metrics

  # A finished run resumed trains no further: it is evaluated for the result,
  # which metrics.jsonl already holds (written before its last checkpoint).
  eval_metrics = None
  if step == total_steps:
    eval_metrics = evaluate_at(step, log=False)
  batches = pipeline.train_iter(start_step)
  try:
    with hooks.PreemptionFlag() as preempted:
      while step < total_steps:
        profiler.before_step(step + 1)
        state, metrics = trainer.train_fn(state, next(batches))
        step += 1
        log.record(step, metrics)
        profiler.after_step(step, state)
        stop, last = preempted.check(step), step == total_steps
        evaluate_now = step % eval_every == 0 or last
        save_now = step % save_every == 0 or last or stop
        if log.due(step) or evaluate_now or save_now:
          log.flush(step, hooks.last_good_checkpoint(save.last_saved, workdir))
        with log.paused():
          if evaluate_now:
            eval_metrics = evaluate_at(step)
          if save_now:
            save(step, state)
        if stop:
          logging.warning('SIGTERM: saved step %d; exiting.', step)
          break
  finally:
    profiler.stop(state, step)
    batches.close()  # Stops a streamed split's decoding threads.
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return {**(eval_metrics or {}), 'step': step}
