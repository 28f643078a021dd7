"""The safe unpickler against payloads that reach code through ``getattr``, the call that every
mmengine checkpoint makes it allow (HistoryBuffer's functions, pickled as ``getattr(<class>, 'min')``).

Each payload is live: the standard unpickler runs it (the test watches it create a file), and the
safe one refuses it before anything runs. They are built from ``__reduce__`` tuples, so pickle writes
the same GLOBAL/REDUCE opcodes an attacker would write by hand, and saved with ``torch.save`` like a
checkpoint.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle

import pytest
import torch
from mmengine.logging.history_buffer import HistoryBuffer

from ultrasam import safe_pickle
from ultrasam.checkpoint import CheckpointError, load_model


class _Call:
    """Pickles as ``function(*args)``: one REDUCE opcode."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args

    def __call__(self, *args):  # pickle wants the function of a REDUCE to look callable
        raise AssertionError("only ever pickled")


def _exec_through(cls: type, marker) -> _Call:
    """``cls.__init__.__globals__.get('__builtins__').get('exec')(code)``: only ``getattr`` and calls."""
    module_globals = _Call(getattr, _Call(getattr, cls, "__init__"), "__globals__")
    builtins_dict = _Call(_Call(getattr, module_globals, "get"), "__builtins__")
    run = _Call(_Call(getattr, builtins_dict, "get"), "exec")
    return _Call(run, f"open({str(marker)!r}, 'w').close()")


def _payloads(marker) -> dict[str, object]:
    return {
        # a real class the loader allows (collections.Counter)
        "getattr on a real class": _exec_through(collections.Counter, marker),
        # mmengine's own class, which the loader replaces by an inert stand-in
        "dunder of a stand-in class": _exec_through(HistoryBuffer, marker),
        # the allowed getattr(HistoryBuffer, 'min'), then a step from the function to its globals
        "getattr on what getattr gave": _Call(_Call(_Call(getattr, _Call(getattr, HistoryBuffer, "min"),
                                                          "__globals__"), "get"), "os"),
        # the class hierarchy: HistoryBuffer.__base__ is object, whose __subclasses__ reach os._wrap_close
        "__base__ chain": _Call(_Call(getattr, _Call(getattr, HistoryBuffer, "__base__"), "__subclasses__")),
    }


@pytest.mark.parametrize("name", list(_payloads(None)))
def test_getattr_payloads_are_refused_before_they_run(tmp_path, name):
    marker = tmp_path / "payload-ran"
    payload = _payloads(marker)[name]
    if name in ("getattr on a real class", "dunder of a stand-in class"):
        pickle.loads(pickle.dumps(payload, protocol=2))  # the standard unpickler runs it
        assert marker.exists()
        marker.unlink()
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "message_hub": {"log_scalars": {"train/loss": payload}}}, path)
    with pytest.raises(CheckpointError, match=r"refused: .*getattr\(.*(could reach code|leads to code)"):
        load_model(path)
    assert not marker.exists()
    for protocol in (2, 4):  # protocol 4 names it builtins.getattr, through STACK_GLOBAL
        with pytest.raises(safe_pickle.UnsafePickleError):
            safe_pickle.loads(pickle.dumps(payload, protocol=protocol))
    assert not marker.exists()


@pytest.mark.parametrize("target", [os, builtins, torch, collections.Counter, HistoryBuffer, safe_pickle.OpaqueObject(),
                                    print, "text"], ids=repr)
def test_getattr_is_refused_on_anything_but_a_stand_in_class(target):
    resolved_getattr = safe_pickle.Unpickler(io.BytesIO(b"")).find_class("__builtin__", "getattr")
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"^the file asks for getattr\(.*could reach code"):
        resolved_getattr(target, "system")


@pytest.mark.parametrize("name", ["__init__", "__globals__", "__base__", "__subclasses__", "__class__", "__dict__",
                                  "__reduce_ex__", "a.b", 3])
def test_getattr_refuses_dunders_and_odd_names_even_on_a_stand_in(name):
    unpickler = safe_pickle.Unpickler(io.BytesIO(b""))
    stand_in = unpickler.find_class("mmengine.logging.history_buffer", "HistoryBuffer")
    with pytest.raises(safe_pickle.UnsafePickleError, match="leads to code"):
        unpickler.find_class("__builtin__", "getattr")(stand_in, name)


def test_what_getattr_gives_is_inert_and_calling_it_is_refused(tmp_path):
    function = safe_pickle.loads(pickle.dumps(_Call(getattr, HistoryBuffer, "mean"), protocol=2))
    assert repr(function) == "<opaque mmengine.logging.history_buffer.HistoryBuffer.mean>"
    call = pickle.dumps(_Call(_Call(getattr, HistoryBuffer, "mean"), [1.0, 2.0]), protocol=2)
    with pytest.raises(safe_pickle.UnsafePickleError, match="asks to call 'mmengine.*HistoryBuffer.mean'"):
        safe_pickle.loads(call)


def test_a_file_cannot_change_the_classes_it_is_given():
    """BUILD with a (None, attributes) state sets attributes on the object below it; here that is
    the Counter class itself, which the standard unpickler lets a file rewrite for the whole process."""
    evil = (b"\x80\x02ccollections\nCounter\n"  # GLOBAL: the class on the stack
            b"N}X\x0b\x00\x00\x00most_commonX\x08\x00\x00\x00replaceds\x86b.")  # (None, {...}) BUILD
    original = collections.Counter.most_common
    with pytest.raises((TypeError, pickle.UnpicklingError)):
        safe_pickle.loads(evil)
    assert collections.Counter.most_common is original
    try:
        pickle.loads(evil)
        assert collections.Counter.most_common == "replaced"  # the payload is live
    finally:
        collections.Counter.most_common = original
