"""Crafted and damaged checkpoints: refused with one line, before memory is allocated, never run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ultrasam.checkpoint import CheckpointError, load_model, sam_from_config
from ultrasam.cli import main

FUZZ = Path(__file__).resolve().parent / "checkpoint_fuzz.py"
FUZZ_COUNT = 203  # 29 of each of the 7 mutation kinds


def _refusal(path: Path) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


@pytest.fixture
def small_state(tiny_config):
    torch.manual_seed(0)
    return sam_from_config(tiny_config).state_dict()


def _save_with(path: Path, state: dict, **changes) -> Path:
    torch.save({"model": {**state, **changes}}, path)
    return path


def _never_loads_tensors(monkeypatch):
    """Make torch.load fail the test: the refusal must come from the declarations alone."""
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran before the shapes were checked"))


def test_huge_declared_pos_embed_is_refused_before_allocation(tmp_path, small_state, monkeypatch):
    # The case: (1, 4096, 4096, 0) holds no bytes, but a model of that grid needs 13 GB.
    path = _save_with(tmp_path / "pos.pth", small_state, **{"image_encoder.pos_embed": torch.zeros(1, 4096, 4096, 0)})
    _never_loads_tensors(monkeypatch)
    assert "image_encoder.pos_embed" in _refusal(path)
    # A full-size pos_embed made of one stored value (stride 0) is refused the same way.
    huge = torch.zeros(1).expand(1, 4096, 4096, 32)
    path = _save_with(tmp_path / "stride.pth", small_state, **{"image_encoder.pos_embed": huge})
    assert "does not fit its storage" in _refusal(path)


def test_relative_position_tables_are_checked_by_name(tmp_path, small_state, monkeypatch):
    _never_loads_tensors(monkeypatch)
    empty = _save_with(tmp_path / "empty.pth", small_state,
                       **{"image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(27, 0)})
    assert "blocks.0.attn.rel_pos_h has shape (27, 0)" in _refusal(empty)  # was ZeroDivisionError
    wrong = _save_with(tmp_path / "wrong.pth", small_state,
                       **{"image_encoder.blocks.2.attn.rel_pos_h": torch.zeros(7, 16)})
    assert _refusal(wrong).split(": ", 1)[1].startswith("tensor image_encoder.blocks.2.attn.rel_pos_h")  # was rel_pos_w


def _rezipped(source: Path, target: Path, edit) -> Path:
    with zipfile.ZipFile(source) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, edit(data) if name.endswith("data.pkl") else data)
    return target


def test_pickle_edits_give_one_line(tmp_path, small_state):
    real = _save_with(tmp_path / "real.pth", small_state)
    garbage = _rezipped(real, tmp_path / "garbage.pth", lambda data: data[:2] + b"\xb4\x07garbage" + data[2:])
    assert "damaged" in _refusal(garbage)  # was _pickle.UnpicklingError: invalid load key
    # LONG_BINPUT 1258292329: CPython's unpickler would size its memo for it (20 GB).
    memo = _rezipped(real, tmp_path / "memo.pth", lambda data: data[:2] + b"N" + b"r" + (1258292329).to_bytes(4, "little")
                     + b"0" + data[2:])
    assert "memo entry 1258292329" in _refusal(memo)


def test_pre_zip_torch_files_are_refused(tmp_path, small_state):
    path = tmp_path / "legacy.pth"
    torch.save({"model": small_state}, path, _use_new_zipfile_serialization=False)
    assert "pre-1.6 format" in _refusal(path)


def test_cli_prints_the_refusal_without_traceback(tmp_path, small_state, capsys):
    path = _save_with(tmp_path / "bad.pth", small_state, **{"image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(27, 0)})
    assert main(["info", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "rel_pos_h" in error and "Traceback" not in error


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures each load in a forked child via /proc")
def test_fuzzed_checkpoints_load_or_are_refused_in_one_line(tmp_path):
    """203 mutants of a small model's checkpoint (random bytes, truncations, pickle bytes and opcode
    edits, code injection, shape and dtype edits; see checkpoint_fuzz.py): each loads or raises
    CheckpointError with one line; none needs more than 2x the memory of loading the real file;
    none runs the injected os.system/exec."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-W", "ignore", str(FUZZ), str(tmp_path), str(FUZZ_COUNT), "13"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    mutants = report["mutants"]
    assert len(mutants) >= 200
    assert {m["kind"] for m in mutants} == {"random bytes", "truncation", "pickle bytes", "pickle opcode",
                                            "code injection", "shape", "dtype"}
    strange = [m for m in mutants if m["outcome"] not in ("loaded", "refused") or "\n" in m["message"]]
    assert not strange, strange[:3]
    assert all(m["outcome"] == "refused" and "could run code" in m["message"]
               for m in mutants if m["kind"] == "code injection")
    assert not (tmp_path / "ran").exists()
    real_kib = max(report["real"])
    assert real_kib > 0
    heavy = [m for m in mutants if m["extra_kib"] > 2 * real_kib]
    assert not heavy, (real_kib, heavy[:3])
    # The mix is meaningful: most kinds are refused, and undamaged-looking files still load.
    outcomes = {(m["kind"], m["outcome"]) for m in mutants}
    assert ("shape", "refused") in outcomes and ("dtype", "loaded") in outcomes
