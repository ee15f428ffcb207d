"""Reads Caffe's `.caffemodel` and `.binaryproto` files without Caffe.

A `.caffemodel` is a serialized `NetParameter` protobuf; this is a decoder of
the protobuf wire format for the few fields nin-jax needs (no protobuf
dependency, nothing generated from caffe.proto):

- NetParameter: 1 name; 100 `layer` (LayerParameter) or, in the older
  format of the model zoo's NiN files, 2 `layers` (V1LayerParameter).
- LayerParameter: 1 name, 2 type (a string), 7 blobs, 106 convolution_param,
  121 pooling_param. V1LayerParameter: 4 name, 5 type (an enum), 6 blobs,
  10 convolution_param, 19 pooling_param.
- BlobProto: 7 shape (BlobShape: 1 dim, packed int64), 5 data (packed
  float), 8 double_data; the legacy 4-D shape 1 num, 2 channels, 3 height,
  4 width. A `.binaryproto` mean file is one BlobProto.
- ConvolutionParameter: 1 num_output, 2 bias_term, 3 pad, 4 kernel_size,
  5 group, 6 stride, 9/10 pad_h/w, 11/12 kernel_h/w, 13/14 stride_h/w.
- PoolingParameter: 1 pool (MAX 0, AVE 1), 2 kernel_size, 3 stride, 4 pad,
  5/6 kernel_h/w, 7/8 stride_h/w, 9/10 pad_h/w, 12 global_pooling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional

import numpy as np
from etils import epath

from nin_jax.errors import DataError

# V1LayerParameter.LayerType values, by the names LayerParameter uses.
V1_TYPES = {
    1: 'Accuracy', 3: 'Concat', 4: 'Convolution', 5: 'Data', 6: 'Dropout',
    8: 'Flatten', 9: 'HDF5Data', 12: 'ImageData', 14: 'InnerProduct',
    15: 'LRN', 17: 'Pooling', 18: 'ReLU', 19: 'Sigmoid', 20: 'Softmax',
    21: 'SoftmaxWithLoss', 22: 'Split', 23: 'TanH', 25: 'Eltwise',
    29: 'MemoryData', 32: 'DummyData', 39: 'Deconvolution',
}
POOL_METHODS = {0: 'MAX', 1: 'AVE', 2: 'STOCHASTIC'}
# Field numbers of (name, type, blobs, convolution_param, pooling_param).
LAYER_FIELDS = {100: (1, 2, 7, 106, 121), 2: (4, 5, 6, 10, 19)}

Fields = dict[int, list[Any]]  # field number -> values (int or bytes)


class CaffeFormatError(DataError):
  """A file that is not the Caffe model (or blob) it should be."""


class _WireError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Convolution:
  """A convolution's settings, each as (height, width) where Caffe allows."""
  kernel: tuple[int, int]
  stride: tuple[int, int]
  pad: tuple[int, int]
  group: int
  bias_term: bool


@dataclasses.dataclass(frozen=True)
class Pooling:
  method: str  # 'MAX', 'AVE' or 'STOCHASTIC'.
  kernel: tuple[int, int]
  stride: tuple[int, int]
  pad: tuple[int, int]
  global_pooling: bool


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer of a Caffe net: its `blobs` (float32, Caffe's NCHW shapes,
  e.g. weights [out, in, kh, kw] and bias [out]) and the settings of a
  convolution or pooling layer."""
  name: str
  type: str
  blobs: tuple[np.ndarray, ...] = ()
  convolution: Optional[Convolution] = None
  pooling: Optional[Pooling] = None


# -------------------------------------------------------------- wire format --

def _varint(data: memoryview, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    if pos >= len(data):
      raise _WireError(f'a number runs past the end at byte {pos}')
    byte = data[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise _WireError(f'a number longer than 10 bytes at byte {pos}')


def _fields(data: memoryview) -> Iterator[tuple[int, Any]]:
  """(field number, value) of each field of a message: an int (varint), a
  memoryview (length-delimited) or 4/8 raw bytes (fixed32/fixed64)."""
  pos = 0
  while pos < len(data):
    start = pos
    key, pos = _varint(data, pos)
    number, wire_type = key >> 3, key & 7
    if number == 0 or wire_type not in (0, 1, 2, 5):
      raise _WireError(f'no protobuf field at byte {start} (field '
                       f'{number}, wire type {wire_type})')
    if wire_type == 0:
      value, pos = _varint(data, pos)
    else:
      size = {1: 8, 5: 4}.get(wire_type)
      if size is None:
        size, pos = _varint(data, pos)
      if pos + size > len(data):
        raise _WireError(f'field {number} at byte {start} runs past the end')
      value, pos = data[pos:pos + size], pos + size
    yield number, value


def _message(data: Any) -> Fields:
  """The fields of an (embedded) message; _WireError if `data` is a number."""
  if isinstance(data, int):
    raise _WireError('a number where a message should be')
  fields: Fields = {}
  for number, value in _fields(data):
    fields.setdefault(number, []).append(value)
  return fields


def _ints(fields: Fields, number: int) -> list[int]:
  """A repeated integer field, packed or not."""
  values = []
  for value in fields.get(number, []):
    if isinstance(value, int):
      values.append(value)
    else:
      pos = 0
      while pos < len(value):
        item, pos = _varint(value, pos)
        values.append(item)
  return values


def _floats(fields: Fields, number: int, dtype: str) -> np.ndarray:
  """A repeated float ('<f4') or double ('<f8') field, packed or not."""
  parts = []
  for value in fields.get(number, []):
    if isinstance(value, int) or len(value) % np.dtype(dtype).itemsize:
      raise _WireError(f'field {number} does not hold {dtype} numbers')
    parts.append(np.frombuffer(value, dtype))
  return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _int(fields: Fields, number: int, default: int) -> int:
  values = _ints(fields, number)
  return values[-1] if values else default


def _text(fields: Fields, number: int) -> str:
  values = fields.get(number)
  if not values:
    return ''
  if isinstance(values[-1], int):
    raise _WireError(f'a number where field {number} should be text')
  return bytes(values[-1]).decode('utf-8', 'replace')


def _pair(fields: Fields, number: int, h: int, w: int,
          default: int) -> tuple[int, int]:
  """(height, width) of a setting given once for both (`number`, repeated)
  or as separate _h/_w fields."""
  both = _ints(fields, number)
  if both:
    return (both[0], both[-1])
  return (_int(fields, h, default), _int(fields, w, default))


# ------------------------------------------------------------------ messages --

def _blob(data: memoryview) -> np.ndarray:
  fields = _message(data)
  values = _floats(fields, 5, '<f4')
  if not values.size:
    values = _floats(fields, 8, '<f8').astype(np.float32)
  if 7 in fields:
    shape = tuple(_ints(_message(fields[7][-1]), 1))
  else:
    shape = tuple(_int(fields, n, 0) for n in (1, 2, 3, 4))
    shape = shape if any(shape) else (values.size,)
  if int(np.prod(shape)) != values.size:
    raise _WireError(f'a blob of shape {list(shape)} holds {values.size} '
                     f'values')
  return values.reshape(shape)


def _convolution(data: memoryview) -> Convolution:
  f = _message(data)
  return Convolution(kernel=_pair(f, 4, 11, 12, 0),
                     stride=_pair(f, 6, 13, 14, 1),
                     pad=_pair(f, 3, 9, 10, 0), group=_int(f, 5, 1),
                     bias_term=bool(_int(f, 2, 1)))


def _pooling(data: memoryview) -> Pooling:
  f = _message(data)
  method = _int(f, 1, 0)
  return Pooling(method=POOL_METHODS.get(method, f'method {method}'),
                 kernel=(_pair(f, 2, 5, 6, 0)),
                 stride=_pair(f, 3, 7, 8, 1), pad=_pair(f, 4, 9, 10, 0),
                 global_pooling=bool(_int(f, 12, 0)))


def _layer(data: memoryview, numbers: tuple[int, ...], v1: bool) -> Layer:
  name, kind, blobs, conv, pool = numbers
  f = _message(data)
  layer_type = (V1_TYPES.get(_int(f, kind, 0), f'V1 type {_int(f, kind, 0)}')
                if v1 else _text(f, kind))
  return Layer(
      name=_text(f, name), type=layer_type,
      blobs=tuple(_blob(b) for b in f.get(blobs, [])),
      convolution=_convolution(f[conv][-1]) if conv in f else None,
      pooling=_pooling(f[pool][-1]) if pool in f else None)


def _read(path: str) -> memoryview:
  try:
    return memoryview(epath.Path(path).read_bytes())
  except OSError as e:
    raise CaffeFormatError(f'{path}: cannot be read ({e}).') from e


def read_net(path: str) -> list[Layer]:
  """The layers of the `.caffemodel` at `path`, in the file's order; raises
  CaffeFormatError (one line, naming the file) if it is not one."""
  data = _read(path)
  try:
    fields = _message(data)
    layers = [_layer(layer, LAYER_FIELDS[number], number == 2)
              for number in LAYER_FIELDS for layer in fields.get(number, [])]
  except _WireError as e:
    raise CaffeFormatError(f'{path}: not a Caffe model ({e}).') from e
  if not layers:
    raise CaffeFormatError(f'{path}: not a Caffe model (it holds no layers).')
  return layers


def net_name(path: str) -> str:
  """The NetParameter's name (field 1) of the `.caffemodel` at `path` ('' if
  it has none); CaffeFormatError if it is not one."""
  try:
    return _text(_message(_read(path)), 1)
  except _WireError as e:
    raise CaffeFormatError(f'{path}: not a Caffe model ({e}).') from e


def read_blob(path: str) -> np.ndarray:
  """The array in a `.binaryproto` (a BlobProto, such as Caffe's mean image
  [1, 3, height, width]); CaffeFormatError if it is not one."""
  data = _read(path)
  try:
    blob = _blob(data)
  except _WireError as e:
    raise CaffeFormatError(f'{path}: not a Caffe blob ({e}).') from e
  if not blob.size:
    raise CaffeFormatError(f'{path}: not a Caffe blob (it holds no values).')
  return blob
