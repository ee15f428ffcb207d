"""The Caffe model zoo's NiN: caffemodels written here in Caffe's format (a
protobuf encoder of its own, below) with random weights, imported, and
compared with an independent NumPy NCHW forward pass of the same Caffe net."""

import hashlib
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import shared_data_dir
from nin_jax import caffe_model
from nin_jax import caffe_zoo
from nin_jax import inference
from nin_jax import preprocessing

REPO = pathlib.Path(__file__).resolve().parents[1]

# ------------------------------------------------ protobuf wire format --


def varint(n):
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def field(number, payload=None, value=None):
  """A length-delimited field (`payload` bytes) or a varint (`value`)."""
  if payload is None:
    return varint(number << 3) + varint(value)
  return varint(number << 3 | 2) + varint(len(payload)) + payload


def blob_proto(array, legacy):
  data = field(5, np.asarray(array, '<f4').tobytes())
  if legacy:  # num, channels, height, width: the V1 files' 4-D shapes.
    dims = (1,) * (4 - array.ndim) + array.shape
    return b''.join(field(n, value=d) for n, d in zip((1, 2, 3, 4), dims)) + data
  dims = b''.join(varint(d) for d in array.shape)
  return field(7, field(1, dims)) + data


# Caffe layer lists, written from the zoo's prototxts: (name, type, settings).
CIFAR10_NET = [
    ('data', 'Data', {}),
    ('conv1', 'Convolution', dict(out=192, k=5, pad=2)), ('relu1', 'ReLU', {}),
    ('cccp1', 'Convolution', dict(out=160, k=1)), ('relu_cccp1', 'ReLU', {}),
    ('cccp2', 'Convolution', dict(out=96, k=1)), ('relu_cccp2', 'ReLU', {}),
    ('pool1', 'Pooling', dict(pool='MAX', k=3, stride=2)),
    ('drop3', 'Dropout', {}),
    ('conv2', 'Convolution', dict(out=192, k=5, pad=2)), ('relu2', 'ReLU', {}),
    ('cccp3', 'Convolution', dict(out=192, k=1)), ('relu_cccp3', 'ReLU', {}),
    ('cccp4', 'Convolution', dict(out=192, k=1)), ('relu_cccp4', 'ReLU', {}),
    ('pool2', 'Pooling', dict(pool='AVE', k=3, stride=2)),
    ('drop6', 'Dropout', {}),
    ('conv3', 'Convolution', dict(out=192, k=3, pad=1)), ('relu3', 'ReLU', {}),
    ('cccp5', 'Convolution', dict(out=192, k=1)), ('relu_cccp5', 'ReLU', {}),
    ('cccp6', 'Convolution', dict(out=10, k=1)), ('relu_cccp6', 'ReLU', {}),
    ('pool3', 'Pooling', dict(pool='AVE', k=8, stride=1)),
    ('accuracy', 'Accuracy', {}), ('loss', 'SoftmaxWithLoss', {}),
]
IMAGENET_NET = [
    ('data', 'Data', {}),
    ('conv1', 'Convolution', dict(out=96, k=11, stride=4)), ('relu0', 'ReLU', {}),
    ('cccp1', 'Convolution', dict(out=96, k=1)), ('relu1', 'ReLU', {}),
    ('cccp2', 'Convolution', dict(out=96, k=1)), ('relu2', 'ReLU', {}),
    ('pool0', 'Pooling', dict(pool='MAX', k=3, stride=2)),
    ('conv2', 'Convolution', dict(out=256, k=5, pad=2)), ('relu3', 'ReLU', {}),
    ('cccp3', 'Convolution', dict(out=256, k=1)), ('relu5', 'ReLU', {}),
    ('cccp4', 'Convolution', dict(out=256, k=1)), ('relu6', 'ReLU', {}),
    ('pool2', 'Pooling', dict(pool='MAX', k=3, stride=2)),
    ('conv3', 'Convolution', dict(out=384, k=3, pad=1)), ('relu7', 'ReLU', {}),
    ('cccp5', 'Convolution', dict(out=384, k=1)), ('relu8', 'ReLU', {}),
    ('cccp6', 'Convolution', dict(out=384, k=1)), ('relu9', 'ReLU', {}),
    ('pool3', 'Pooling', dict(pool='MAX', k=3, stride=2)),
    ('drop', 'Dropout', {}),
    ('conv4-1024', 'Convolution', dict(out=1024, k=3, pad=1)),
    ('relu10', 'ReLU', {}),
    ('cccp7-1024', 'Convolution', dict(out=1024, k=1)), ('relu11', 'ReLU', {}),
    ('cccp8-1024', 'Convolution', dict(out=1000, k=1)), ('relu12', 'ReLU', {}),
    ('pool4', 'Pooling', dict(pool='AVE', k=6, stride=1)),
    ('loss', 'SoftmaxWithLoss', {}),
]
V1_ENUMS = {'Data': 5, 'Convolution': 4, 'ReLU': 18, 'Pooling': 17,
            'Dropout': 6, 'Accuracy': 1, 'SoftmaxWithLoss': 21,
            'InnerProduct': 14}


def random_weights(net, channels, seed=0, first_scale=1.0):
  """{layer: (weights [out, in, k, k], bias [out])}, He-scaled, the first
  layer's times `first_scale`."""
  rng = np.random.default_rng(seed)
  weights = {}
  for name, kind, s in net:
    if kind == 'Convolution':
      fan_in = channels * s['k'] ** 2
      scale = math.sqrt(2 / fan_in) * (1.0 if weights else first_scale)
      weights[name] = (
          (rng.normal(size=(s['out'], channels, s['k'], s['k'])) * scale
           ).astype(np.float32),
          rng.normal(scale=0.1, size=s['out']).astype(np.float32))
      channels = s['out']
  return weights


def encode_net(net, weights, v1):
  """A serialized NetParameter: V1 `layers` (field 2, type enums, legacy
  shapes) as the zoo's files, or `layer` (field 100)."""
  # (name, type, blobs, convolution_param, pooling_param) field numbers.
  numbers = (4, 5, 6, 10, 19) if v1 else (1, 2, 7, 106, 121)
  out = field(1, b'nin')
  for name, kind, s in net:
    layer = field(numbers[0], name.encode())
    layer += (field(numbers[1], value=V1_ENUMS[kind]) if v1 else
              field(numbers[1], kind.encode()))
    for array in weights.get(name, ()):
      layer += field(numbers[2], blob_proto(array, legacy=v1))
    if kind == 'Convolution':
      param = field(1, value=s['out']) + field(4, value=s['k'])
      if s.get('pad'):
        param += field(3, value=s['pad'])
      if s.get('stride', 1) != 1:
        param += field(6, value=s['stride'])
      layer += field(numbers[3], param)
    if kind == 'Pooling':
      layer += field(numbers[4], field(1, value={'MAX': 0, 'AVE': 1}[
          s['pool']]) + field(2, value=s['k']) + field(3, value=s['stride']))
    out += field(2 if v1 else 100, layer)
  return out


# ------------------------------------------ an independent Caffe forward --

def caffe_conv(x, w, b, stride, pad):
  """Caffe's convolution (a cross-correlation) of x [n, c, h, w]."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  k = w.shape[-1]
  patches = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))
  patches = patches[:, :, ::stride, ::stride]
  n, c, oh, ow = patches.shape[:4]
  cols = patches.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, -1)
  out = cols @ w.reshape(w.shape[0], -1).astype(np.float64).T + b
  return out.reshape(n, oh, ow, -1).transpose(0, 3, 1, 2)


def caffe_pool(x, method, k, stride):
  """Caffe's pooling: output size rounded up, windows clipped to the input,
  an average divided by the clipped window's size."""
  n, c, h, w = x.shape
  size = lambda d: math.ceil((d - k) / stride) + 1 if d > k else 1
  out = np.empty((n, c, size(h), size(w)))
  for i in range(size(h)):
    for j in range(size(w)):
      window = x[:, :, i * stride:min(i * stride + k, h),
                 j * stride:min(j * stride + k, w)]
      out[:, :, i, j] = (window.max((2, 3)) if method == 'MAX'
                         else window.mean((2, 3)))
  return out


def caffe_forward(net, weights, x):
  """Class scores [n, classes] of the Caffe net on inputs x [n, c, h, w]."""
  x = x.astype(np.float64)
  for name, kind, s in net:
    if kind == 'Convolution':
      x = caffe_conv(x, *weights[name], s.get('stride', 1), s.get('pad', 0))
    elif kind == 'ReLU':
      x = np.maximum(x, 0)
    elif kind == 'Pooling':
      x = caffe_pool(x, s['pool'], s['k'], s['stride'])
  return x.reshape(x.shape[0], -1)


def softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def model_probabilities(workdir, images):
  trained = inference.load(str(workdir))
  fn = inference.probabilities_fn(trained)
  return trained, np.asarray(fn(trained.variables, images))


# ----------------------------------------------------------------- tests --

def test_imagenet_v1_caffemodel_matches_caffe_with_mean_image(tmp_path):
  weights = random_weights(IMAGENET_NET, 3, first_scale=0.01)  # 0-255 in.
  model_file = tmp_path / 'nin_imagenet.caffemodel'
  model_file.write_bytes(encode_net(IMAGENET_NET, weights, v1=True))
  rng = np.random.default_rng(1)
  mean_bgr = rng.uniform(90, 130, (1, 3, 256, 256))
  (tmp_path / 'mean.binaryproto').write_bytes(blob_proto(mean_bgr, True))
  (tmp_path / 'names.txt').write_text(
      ''.join(f'n{i:08d} thing {i}\n' for i in range(1000)))
  workdir = tmp_path / 'imported'
  count = caffe_zoo.import_caffemodel(
      str(model_file), 'imagenet', str(workdir),
      mean_file=str(tmp_path / 'mean.binaryproto'),
      class_names=str(tmp_path / 'names.txt'))
  assert count == 7_595_176

  # A 256x256 RGB file: Caffe's test input is its central 224x224 in BGR
  # minus the mean image's central 224x224.
  image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / 'photo.png')
  crop = image[16:240, 16:240]
  caffe_input = (crop[..., ::-1].transpose(2, 0, 1)[None].astype(np.float64)
                 - mean_bgr[:, :, 16:240, 16:240])
  expected = softmax(caffe_forward(IMAGENET_NET, weights, caffe_input))
  assert 0.002 < expected.max() < 0.9  # Neither flat nor one-hot.

  trained, probabilities = model_probabilities(workdir, crop[None])
  np.testing.assert_allclose(probabilities, expected, atol=1e-5, rtol=0)
  assert trained.inputs.class_names[7] == 'thing 7'
  from_file = inference.load_image(str(tmp_path / 'photo.png'), trained.inputs)
  np.testing.assert_array_equal(from_file, crop)


def low_rank_zca(x, filter_bias=0.1):
  """`preprocessing.fit_zca` for fewer images than dimensions, from the SVD
  of the centred data: the same matrix without a 3072x3072 eigh (about 30 s
  on 2 cores; the fit itself is tested in test_data.py)."""
  flat = x.reshape(x.shape[0], -1).astype(np.float64)
  mean = flat.mean(0)
  _, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
  gain = 1 / np.sqrt(s ** 2 / len(flat) + filter_bias) - 1 / np.sqrt(
      filter_bias)
  whiten = (vt.T * gain) @ vt + np.eye(flat.shape[1]) / np.sqrt(filter_bias)
  return mean.astype(np.float32), whiten.astype(np.float32)


def test_cifar10_caffemodel_matches_caffe_after_gcn_zca(tmp_path,
                                                        monkeypatch, caplog):
  small = np.random.default_rng(4).normal(size=(30, 4, 4, 3))
  for ours, theirs in zip(low_rank_zca(small), preprocessing.fit_zca(small)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
  monkeypatch.setattr(preprocessing, 'fit_zca', low_rank_zca)
  weights = random_weights(CIFAR10_NET, 3, seed=2)
  model_file = tmp_path / 'cifar10_nin.caffemodel'
  model_file.write_bytes(encode_net(CIFAR10_NET, weights, v1=False))
  rng = np.random.default_rng(3)
  x_train = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
  x_test = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  data = tmp_path / 'cifar10.npz'
  np.savez(data, x_train=x_train, y_train=np.arange(40) % 10, x_test=x_test,
           y_test=np.arange(6) % 10)
  workdir = tmp_path / 'imported'
  caffe_zoo.import_caffemodel(str(model_file), 'cifar10', str(workdir),
                              dataset=f'npz:{data}')
  # Not the zoo's file: imported all the same, with a warning naming both.
  digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
  warned = [r.getMessage() for r in caplog.records if 'sha256' in
            r.getMessage()]
  assert warned == [
      f'{model_file} has sha256 {digest}, not {caffe_zoo.ZOO["cifar10"].sha256}'
      ' (the cifar10 model of https://gist.github.com/mavenlin/'
      'e56253735ef32c3c296d): importing it as weights of the same net; '
      'results measured with the zoo file do not apply to it.']

  trained, probabilities = model_probabilities(workdir, x_test)
  assert trained.inputs.class_names[0] == 'airplane'
  # GCN (scale 55) and the saved ZCA, applied to the HWC-flattened images.
  flat = x_test.reshape(6, -1).astype(np.float64)
  flat -= flat.mean(1, keepdims=True)
  flat *= 55.0 / np.linalg.norm(flat, axis=1, keepdims=True)
  arrays = trained.inputs.fitted.arrays
  white = ((flat - arrays['zca_mean']) @ arrays['zca_whiten']).reshape(
      6, 32, 32, 3)
  logits = caffe_forward(CIFAR10_NET, weights, white.transpose(0, 3, 1, 2))
  np.testing.assert_allclose(probabilities, softmax(logits), atol=1e-5,
                             rtol=0)
  assert 0.15 < softmax(logits).max() < 0.99

  result = inference.evaluate(str(workdir))
  assert result['examples'] == 6 and result['step'] == 0
  assert result['source'] == 'cifar10_nin.caffemodel (net nin)'
  assert result['accuracy'] == np.mean(logits.argmax(1) == np.arange(6) % 10)


def mutated(net, name, **changes):
  return [(n, k, dict(s, **changes) if n == name else s) for n, k, s in net]


@pytest.mark.parametrize('net,layer', [
    (mutated(CIFAR10_NET, 'conv2', k=3), 'conv2'),
    (mutated(CIFAR10_NET, 'pool2', pool='MAX'), 'pool2'),
    (mutated(CIFAR10_NET, 'cccp5', out=160), 'cccp5'),
    ([l for l in CIFAR10_NET if l[0] != 'relu_cccp6'], 'pool3'),
    (CIFAR10_NET + [('fc', 'InnerProduct', {})], 'fc'),
    (CIFAR10_NET[:12], 'cccp3'),
])
def test_a_net_that_is_not_the_preset_names_the_first_differing_layer(
    tmp_path, net, layer):
  weights = random_weights(net, 3)
  path = tmp_path / 'other.caffemodel'
  path.write_bytes(encode_net(net, weights, v1=False))
  with pytest.raises(caffe_model.CaffeFormatError) as error:
    caffe_zoo.import_caffemodel(str(path), 'cifar10',
                                   str(tmp_path / 'w'), dataset='npz:unused')
  message = str(error.value)
  assert f"'{layer}'" in message and str(path) in message
  assert '\n' not in message
  assert not (tmp_path / 'w').exists()  # Nothing written.


def test_files_that_are_not_caffemodels_are_one_line_errors(tmp_path):
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / 'a.png')
  np.savez(tmp_path / 'b.npz', x=np.zeros(3))
  (tmp_path / 'c.caffemodel').write_bytes(
      np.random.default_rng(0).bytes(1000))
  (tmp_path / 'd.caffemodel').write_bytes(field(1, b'only a name'))
  for name in ('a.png', 'b.npz', 'c.caffemodel', 'd.caffemodel',
               'missing.caffemodel'):
    with pytest.raises(caffe_model.CaffeFormatError,
                       match=r'(not a Caffe model|cannot be read)') as error:
      caffe_model.read_net(str(tmp_path / name))
    assert str(tmp_path / name) in str(error.value)
  out = subprocess.run(
      [sys.executable, '-m', 'nin_jax.caffe_import',
       f'--caffemodel={tmp_path / "a.png"}', '--preset=imagenet',
       f'--workdir={tmp_path / "w"}'],
      capture_output=True, text=True, timeout=120, cwd=REPO)
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  errors = [l for l in out.stderr.splitlines()
            if l.startswith('nin_jax: error:')]
  assert len(errors) == 1 and f'{tmp_path / "a.png"}: not a Caffe model' in (
      errors[0])


def test_the_zoo_file_is_recognised_by_its_sha256(tmp_path):
  """The sha256 nin-jax checks is the shared copy's (../shared/data/README.md
  gives the same); a one-byte change is caught."""
  path = shared_data_dir() / 'caffe' / 'cifar10_nin.caffemodel'
  if not path.exists():
    pytest.skip(f'{path} not found; set NIN_JAX_DATA_DIR')
  zoo = caffe_zoo.ZOO['cifar10']
  assert caffe_zoo.check_provenance(
      str(path), caffe_zoo.file_sha256(str(path)), zoo) is None
  data = bytearray(path.read_bytes())
  data[-1] ^= 1
  changed = tmp_path / 'changed.caffemodel'
  changed.write_bytes(bytes(data))
  assert zoo.sha256 in caffe_zoo.check_provenance(
      str(changed), caffe_zoo.file_sha256(str(changed)), zoo)
