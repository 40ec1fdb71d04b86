"""Reading a PyTorch state dict (`torch.save(model.state_dict(), path)`) without PyTorch.

    state = load_state_dict("pt_inception-2015-12-05-6726825d.pth")   # {name: np.ndarray}

Both of torch.save's formats are read:
  * the zip format (torch >= 1.6): `<archive>/data.pkl` is a pickle whose tensors point, by persistent
    id ('storage', storage type, key, location, numel), at raw little-endian storages `<archive>/data/<key>`;
  * the legacy format (older torch, or `_use_new_zipfile_serialization=False`): five pickles in a row
    (magic number, protocol version, system info, the object, the storage keys), then each storage as an
    8-byte little-endian element count followed by its bytes, in the order of the keys.

The unpickler accepts only what a state dict holds (OrderedDicts, tensors rebuilt by
`torch._utils._rebuild_tensor_v2` over typed storages): like `torch.load(weights_only=True)`, it never
runs code named by the file. numpy only; no JAX, no torch.
"""

import collections
import pickle
import struct
import zipfile
from typing import Dict

import numpy as np

_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class TorchFileError(ValueError):
  """The file is not a PyTorch state dict this reader understands (the message says why)."""


class _StorageType:
  def __init__(self, name):
    if name not in _DTYPES:
      raise TorchFileError(f"tensors of storage type torch.{name} are not supported "
                           f"(supported: {', '.join(sorted(_DTYPES))})")
    self.dtype = np.dtype(_DTYPES[name]).newbyteorder("<")


class _Tensor:
  """A tensor whose storage may not have been read yet (the legacy format stores data after the pickle)."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def array(self, storages) -> np.ndarray:
    key, dtype, view_offset = self.storage
    flat = storages[key].view(dtype)[view_offset:]
    if not self.size:
      return flat[self.offset].copy()
    strided = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size, strides=[s * dtype.itemsize for s in self.stride])
    return np.ascontiguousarray(strided).astype(dtype.newbyteorder("="))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


class _Unpickler(pickle.Unpickler):
  """Builds _Tensor records; storages are named by the persistent ids and read by the caller."""

  def __init__(self, file):
    super().__init__(file)
    self.storages = {}  # key -> (dtype, numel)

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor_v2
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    raise TorchFileError(f"holds a {module}.{name}, which a state dict of tensors does not; "
                         "save the model's state_dict() instead")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise TorchFileError(f"unknown persistent id {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    view_offset = 0
    if len(pid) > 5 and pid[5] is not None:  # legacy: a view (view key, offset, size) of the storage
      _, view_offset, _ = pid[5]
    if not isinstance(storage_type, _StorageType):
      raise TorchFileError(f"storage {key} has no typed storage class")
    self.storages[key] = (storage_type.dtype, numel)
    return (key, storage_type.dtype, view_offset)


def _resolve(obj, storages):
  if isinstance(obj, _Tensor):
    return obj.array(storages)
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _resolve(v, storages)) for k, v in obj.items())
  return obj


def _load_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
      raise TorchFileError("is a zip file without one data.pkl: not written by torch.save")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
    if byteorder != "little":
      raise TorchFileError(f"was saved with {byteorder}-endian storages; only little-endian is supported")
    with archive.open(pickles[0]) as f:
      unpickler = _Unpickler(f)
      obj = unpickler.load()
    storages = {}
    for key, (dtype, numel) in unpickler.storages.items():
      raw = archive.read(f"{prefix}data/{key}")
      if len(raw) < numel * dtype.itemsize:
        raise TorchFileError(f"storage {key} is truncated")
      storages[key] = np.frombuffer(raw, np.uint8)
  return _resolve(obj, storages)


def _load_legacy(path: str):
  with open(path, "rb") as f:
    if _Unpickler(f).load() != _LEGACY_MAGIC:
      raise TorchFileError("is neither a zip file nor a legacy torch.save file (wrong magic number)")
    _Unpickler(f).load()  # protocol version
    _Unpickler(f).load()  # system info (endianness, type sizes)
    unpickler = _Unpickler(f)
    obj = unpickler.load()
    keys = _Unpickler(f).load()
    storages = {}
    for key in keys:
      dtype, _ = unpickler.storages[str(key)]
      header = f.read(8)
      if len(header) < 8:
        raise TorchFileError(f"storage {key} is truncated")
      (numel,) = struct.unpack("<q", header)
      raw = f.read(numel * dtype.itemsize)
      if len(raw) < numel * dtype.itemsize:
        raise TorchFileError(f"storage {key} is truncated")
      storages[str(key)] = np.frombuffer(raw, np.uint8)
  return _resolve(obj, storages)


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{name: numpy array} from a torch.save file of a state dict (either format). Raises
  TorchFileError (a ValueError) for a file it cannot read, saying why; OSError if it cannot be opened."""
  try:
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  except (pickle.UnpicklingError, EOFError, KeyError, zipfile.BadZipFile, struct.error) as e:
    raise TorchFileError(f"is not a readable torch.save file ({type(e).__name__}: {e})") from None
  if not isinstance(obj, dict):
    raise TorchFileError(f"holds a {type(obj).__name__}, not a state dict")
  return dict(obj)
