"""A pickle module for ``torch.load`` that never runs code from the file.

Checkpoints downloaded from the internet are pickles, and a pickle may name any importable
callable (``os.system``, ``builtins.exec``) for the loader to call. This unpickler resolves only:

- the few torch and numpy functions that rebuild tensors, arrays and scalars from raw bytes;
- plain containers (``collections.OrderedDict``);
- classes of the OpenMMLab training framework (``mmengine``, ``mmdet``, ``mmcv``) and
  ``argparse.Namespace``, which checkpoints such as UltraSam's carry as bookkeeping: each becomes an
  inert :class:`OpaqueObject` that stores its arguments and state, so no mmengine is needed and
  none of their code runs.

Any other global makes loading stop with :class:`UnsafePickleError`, before it is called.
Pass this module as ``torch.load(..., pickle_module=safe_pickle, weights_only=False)``.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

# (module, name) pairs that only rebuild data from bytes and arguments.
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes (numpy scalars)
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}

# Training-framework bookkeeping that is kept as inert data.
_OPAQUE_ROOTS = ("mmengine", "mmdet", "mmcv", "mmpretrain")
_OPAQUE_EXACT = {("argparse", "Namespace")}


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks to call something that could run code; it was not called."""


class OpaqueObject:
    """Stand-in for a class this loader will not import; keeps what the pickle gave it."""

    pickled_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.pickled_name}>"


def _opaque_class(module: str, name: str) -> type:
    return type(name, (OpaqueObject,), {"pickled_name": f"{module}.{name}", "__module__": __name__})


def _is_numpy_dtype_class(module: str, name: str) -> bool:
    # numpy >= 1.25 pickles dtypes through their classes, e.g. numpy.dtypes.Float64DType.
    return module == "numpy.dtypes" and name.endswith("DType")


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals listed in this module."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or _is_numpy_dtype_class(module, name):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in _OPAQUE_ROOTS or (module, name) in _OPAQUE_EXACT:
            return _opaque_class(module, name)
        raise UnsafePickleError(
            f"the file asks to call '{module}.{name}', which could run code; refusing to load it"
        )


def load(file: Any, **kwargs: Any) -> Any:
    """``pickle.load`` through :class:`Unpickler` (torch's legacy format calls this)."""
    return Unpickler(file, **kwargs).load()


def loads(data: bytes, **kwargs: Any) -> Any:
    return load(io.BytesIO(data), **kwargs)
