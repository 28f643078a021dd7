"""A pickle module for ``torch.load`` that never runs code from the file.

Checkpoints downloaded from the internet are pickles, and a pickle may name any importable
callable (``os.system``, ``builtins.exec``) for the loader to call. This unpickler resolves only:

- the few torch and numpy functions that rebuild tensors, arrays and scalars from raw bytes;
- plain containers (``collections.OrderedDict``, ``collections.Counter``: the milestones of
  mmengine's MultiStepLR);
- classes of the OpenMMLab training framework (``mmengine``, ``mmdet``, ``mmcv``) and
  ``argparse.Namespace``, which checkpoints such as UltraSam's carry as bookkeeping: each becomes an
  inert :class:`OpaqueObject` that stores its arguments and state, so no mmengine is needed and
  none of their code runs;
- ``getattr`` on those stand-in classes only. Pickle protocol 2 (``torch.save``'s) stores a
  function with a dotted name as ``getattr(<class>, 'name')``; mmengine's ``HistoryBuffer`` pickles
  its ``min``/``max``/``current``/``mean`` that way in every checkpoint with a message hub. The
  answer is an inert :class:`OpaqueAttribute`. ``getattr`` on anything else (a module, a real
  class, a function) or of a dunder name (``__init__``, ``__globals__``, ``__base__``: the first
  steps of the chains that reach ``exec``) is refused.

Any other global makes loading stop with :class:`UnsafePickleError`, before it is called.
Pass this module as ``torch.load(..., pickle_module=safe_pickle, weights_only=False)``.
"""

from __future__ import annotations

import functools
import io
import pickle
import types
from typing import Any

import torch

# (module, name) pairs that only rebuild data from bytes and arguments.
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("collections", "Counter"),
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
_GETATTR = {("__builtin__", "getattr"), ("builtins", "getattr")}  # protocol 2 writes __builtin__
_HEAP_TYPE, _IMMUTABLE_TYPE = 1 << 9, 1 << 8  # CPython's type flags


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


class OpaqueAttribute:
    """What ``getattr(<stand-in class>, name)`` gives: the dotted name, nothing that can run."""

    def __init__(self, owner: str, name: str) -> None:
        self.pickled_name = f"{owner}.{name}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(f"the file asks to call '{self.pickled_name}', which could run code; refusing to load it")

    def __repr__(self) -> str:
        return f"<opaque {self.pickled_name}>"


def _stand_in_getattr(target: Any, name: Any, *default: Any) -> OpaqueAttribute:
    """``getattr`` as a pickle may call it: only a non-dunder name of one of our stand-in classes."""
    if not (isinstance(target, type) and issubclass(target, OpaqueObject)):
        raise UnsafePickleError(
            f"the file asks for getattr({_describe(target)}, {name!r}), which could reach code; refusing to load it"
        )
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("__"):
        raise UnsafePickleError(
            f"the file asks for getattr({target.pickled_name}, {name!r}), a name that leads to code; "
            "refusing to load it"
        )
    return OpaqueAttribute(target.pickled_name, name)


def _describe(value: Any) -> str:
    """A short, side-effect-free description (no ``repr`` of objects the file built)."""
    value = value.func if isinstance(value, functools.partial) else value  # as _unshared wrapped it
    if isinstance(value, types.ModuleType):
        return f"module {value.__name__}"
    if isinstance(value, type):
        return f"class {value.__module__}.{value.__qualname__}"
    return f"a {type(value).__name__} object"


def _unshared(value: Any) -> Any:
    """``value``, or for a Python function or mutable class a fresh wrapper calling it.

    A pickle's BUILD opcode sets attributes on whatever object it holds; behind the wrapper a file
    cannot change ``collections.Counter`` or torch's functions for the rest of the process.
    """
    mutable_class = isinstance(value, type) and value.__flags__ & _HEAP_TYPE and not value.__flags__ & _IMMUTABLE_TYPE
    return functools.partial(value) if isinstance(value, types.FunctionType) or mutable_class else value


def _opaque_class(module: str, name: str) -> type:
    return type(name, (OpaqueObject,), {"pickled_name": f"{module}.{name}", "__module__": __name__})


def _is_numpy_dtype_class(module: str, name: str) -> bool:
    # numpy >= 1.25 pickles dtypes through their classes, e.g. numpy.dtypes.Float64DType.
    return module == "numpy.dtypes" and name.endswith("DType")


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals listed in this module."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GETATTR:
            return _stand_in_getattr
        if (module, name) in _ALLOWED or (_is_numpy_dtype_class(module, name) and name.isidentifier()):
            return _unshared(super().find_class(module, name))
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
