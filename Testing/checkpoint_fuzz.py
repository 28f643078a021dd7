"""Fuzz ``ultrasam.checkpoint.load_model`` with mutated checkpoints of a small SAM model.

Run as a script (``python checkpoint_fuzz.py FOLDER COUNT SEED``) by test_robust_checkpoint.py:
it writes the real checkpoint and COUNT mutants into FOLDER, loads each one in a forked child
(so every load has its own peak memory, read back with ``os.wait4``), and prints one JSON object:
the real load's extra memory (at the start and the end) and, per mutant, its kind, outcome ("loaded", "refused" or the name
of any other exception), message and extra memory. A mutant that manages to call ``os.system``
or ``exec`` would create FOLDER/ran; the test checks that it never appears.

Mutation kinds: random bytes anywhere (mostly caught by the zip's CRC), truncations, random bytes
after the pickle's protocol header and single-opcode edits of ``data.pkl`` (re-zipped with a valid
CRC, so the unpickler sees them), injected calls to ``os.system``/``builtins.exec``, and tensors
saved with other shapes (zero, huge, stride 0) or dtypes.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import zipfile
from pathlib import Path

import torch

from ultrasam.checkpoint import CheckpointError, SamConfig, load_model, sam_from_config, save_checkpoint

# A small SAM (about 6 MB of weights), so that 200 loads stay fast and a load's memory stands
# out from the allocator's noise.
CONFIG = SamConfig(encoder_embed_dim=32, encoder_depth=4, encoder_num_heads=2, encoder_global_attn_indexes=(1, 3),
                   encoder_mlp_ratio=2.0, image_size=256, encoder_window_size=4, prompt_embed_dim=128,
                   decoder_mlp_dim=1024, iou_head_hidden_dim=128)


def mutants(folder: Path, real: Path, count: int, rng: random.Random):
    """Yield (kind, path) for ``count`` mutated copies of ``real``."""
    data = real.read_bytes()
    with zipfile.ZipFile(real) as archive:
        names = archive.namelist()
        records = {name: archive.read(name) for name in names}
    pickle_name = next(name for name in names if name.endswith("data.pkl"))
    state = sam_from_config(CONFIG).state_dict()
    makers = [
        ("random bytes", lambda: _random_bytes(data, rng)),
        ("truncation", lambda: data[: rng.randrange(1, len(data))]),
        ("pickle bytes", lambda: _rezip(names, records, pickle_name, _after_header(records[pickle_name], rng))),
        ("pickle opcode", lambda: _rezip(names, records, pickle_name, _flip_opcode(records[pickle_name], rng))),
        ("code injection", lambda: _rezip(names, records, pickle_name, _inject(records[pickle_name], folder, rng))),
        ("shape", lambda: _saved({**state, **_reshaped(state, rng)})),
        ("dtype", lambda: _saved({**state, **_retyped(state, rng)})),
    ]
    for number in range(count):
        kind, make = makers[number % len(makers)]
        path = folder / f"mutant{number:03d}.pth"
        path.write_bytes(make())
        yield kind, path


def _random_bytes(data: bytes, rng: random.Random) -> bytes:
    mutated = bytearray(data)
    for _ in range(rng.randrange(1, 16)):
        mutated[rng.randrange(len(mutated))] = rng.randrange(256)
    return bytes(mutated)


def _after_header(pickle: bytes, rng: random.Random) -> bytes:
    return pickle[:2] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) + pickle[2:]


def _flip_opcode(pickle: bytes, rng: random.Random) -> bytes:
    mutated = bytearray(pickle)
    position = rng.randrange(2, len(mutated))
    mutated[position] = rng.choice([rng.randrange(256), *b"cRq.)(tX}]\x8c\x94\x85\x86\x87KJM"])
    return bytes(mutated)


def _inject(pickle: bytes, folder: Path, rng: random.Random) -> bytes:
    """A call to os.system / builtins.exec that would create folder/ran, placed first in the pickle."""
    target = str(folder / "ran")
    module, name, argument = rng.choice([
        ("os", "system", f"touch {target}"), ("posix", "system", f"touch {target}"),
        ("builtins", "exec", f"open({target!r}, 'w').close()"), ("builtins", "eval", f"open({target!r}, 'w')"),
    ])
    call = f"c{module}\n{name}\n(V{argument}\ntR0".encode()  # GLOBAL, MARK, string, TUPLE, REDUCE, POP
    return pickle[:2] + call + pickle[2:]


def _rezip(names, records, changed: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in names:
            archive.writestr(name, content if name == changed else records[name])
    return buffer.getvalue()


def _reshaped(state: dict, rng: random.Random) -> dict:
    name = rng.choice(sorted(state))
    shape = list(state[name].shape) or [1]
    axis = rng.randrange(len(shape))
    choice = rng.randrange(4)
    if choice == 0:
        shape[axis] = 0
    elif choice == 1:
        shape[axis] += rng.choice([-1, 1, 7])
        shape[axis] = max(shape[axis], 1)
    elif choice == 2:  # huge, declared through a stride-0 view of one value
        return {name: torch.zeros(1).expand(*[4096] * len(shape))}
    else:
        shape = shape + [1] if rng.random() < 0.5 else shape[1:] or [3]
    return {name: torch.zeros(shape)}


def _retyped(state: dict, rng: random.Random) -> dict:
    name = rng.choice(sorted(state))
    dtype = rng.choice([torch.float16, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool,
                        torch.complex64])
    return {name: state[name].to(dtype)}


def _saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": state}, buffer)
    return buffer.getvalue()


def _forked_load(path: Path | None) -> tuple[str, str, int]:
    """Load ``path`` (nothing when None) in a forked child: (outcome, message, child's peak RSS KiB)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read_end)
        try:
            if path is not None:
                load_model(path)
            outcome, message = "loaded", ""
        except CheckpointError as error:
            outcome, message = "refused", str(error)
        except BaseException as error:  # what the test forbids: report it
            outcome, message = type(error).__name__, str(error)[:300]
        os.write(write_end, json.dumps([outcome, message]).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as stream:
        reply = stream.read()
    _, status, usage = os.wait4(child, 0)
    outcome, message = json.loads(reply) if reply else (f"died (status {status})", "")
    return outcome, message, usage.ru_maxrss


def extra_memory(path: Path) -> tuple[str, str, int]:
    """Load ``path`` in a forked child: (outcome, message, its peak RSS above that of a child that
    loads nothing, in KiB). A forked child starts with the parent's mapped pages counted."""
    outcome, message, peak = _forked_load(path)
    return outcome, message, max(peak - _forked_load(None)[2], 0)


def main(folder: str, count: str, seed: str) -> None:
    torch.set_num_threads(1)  # forked children must not inherit a busy thread pool
    folder_path = Path(folder)
    torch.manual_seed(0)
    real = save_checkpoint(folder_path / "real.pth", sam_from_config(CONFIG))
    load_model(real)  # warm up lazy imports and allocator pools in the parent
    report = {"real": [extra_memory(real)[2]], "model_bytes": real.stat().st_size, "mutants": []}
    for kind, path in mutants(folder_path, real, int(count), random.Random(int(seed))):
        outcome, message, memory = extra_memory(path)
        report["mutants"].append({"kind": kind, "file": path.name, "outcome": outcome, "message": message,
                                  "extra_kib": memory})
        path.unlink()
    report["real"].append(extra_memory(real)[2])  # the parent's heap changes over the run: measure twice
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
