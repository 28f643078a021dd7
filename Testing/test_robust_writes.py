"""Nothing lost, nothing silent: full disks, modes, interrupts and outputs checked before the work."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from test_3d_fakes import micro_sam
from ultrasam.atomic import WriteError, write_text_atomic
from ultrasam.checkpoint import save_checkpoint
from ultrasam.cli import main
from ultrasam.geometry import Geometry
from ultrasam.resources import SAMPLE_VOLUME
from ultrasam.volume_io import MASK_SUFFIXES, write_mask

# What SimpleITK and torch do on a full disk, measured on a filled 4 MB tmpfs in this project's
# sandbox (SimpleITK 2.x, torch 2.x): WriteImage leaves a 0-byte file and returns for .nii.gz, .nii,
# .nrrd, .mha and .png; torch.save raises this RuntimeError; Python's own writes raise ENOSPC.
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
IDENTITY = Geometry(np.zeros(3), np.ones(3), np.eye(3))


class FullDisk:
    """A folder whose disk is full once :meth:`fill` is called.

    ``real``: a 4 MB tmpfs (needs root on Linux). Otherwise the writers are patched, for paths
    inside the folder only, to do what they do on that full tmpfs (see above).
    """

    def __init__(self, folder: Path, monkeypatch, real: bool) -> None:
        self.folder, self._monkeypatch, self.real = folder, monkeypatch, real
        folder.mkdir()
        if real and not _mount_tmpfs(folder):
            pytest.skip("cannot mount a tmpfs here (needs root on Linux); the patched-writer variant runs instead")

    def fill(self) -> None:
        if self.real:
            _fill(self.folder / "filler")
        else:
            self._patch_writers()

    def files(self) -> set[str]:
        return {p.name for p in self.folder.iterdir()} - {"filler"}

    def _inside(self, path) -> bool:
        return Path(path).resolve().parent == self.folder.resolve()

    def _patch_writers(self) -> None:
        write_image, save, write_bytes = sitk.WriteImage, torch.save, Path.write_bytes

        def full_write_image(image, path, *args, **kwargs):
            if not self._inside(path):
                return write_image(image, path, *args, **kwargs)
            open(path, "wb").close()  # what SimpleITK leaves on a full disk, without an error

        def full_save(payload, path, *args, **kwargs):
            if not self._inside(path):
                return save(payload, path, *args, **kwargs)
            with open(path, "wb") as stream:
                stream.write(b"PK\x03\x04")  # what fitted
            raise RuntimeError(TORCH_FULL_DISK)

        def full_write_bytes(path, data):
            if self._inside(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write_bytes(path, data)

        self._monkeypatch.setattr(sitk, "WriteImage", full_write_image)
        self._monkeypatch.setattr(torch, "save", full_save)
        self._monkeypatch.setattr(Path, "write_bytes", full_write_bytes)

    def close(self) -> None:
        if self.real:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


def _mount_tmpfs(folder: Path) -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], capture_output=True)
    return result.returncode == 0


def _fill(path: Path) -> None:
    handle = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(handle, b"x" * chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
    finally:
        os.close(handle)


@pytest.fixture(params=["tmpfs", "patched writers"])
def full_disk(tmp_path, monkeypatch, request):
    disk = FullDisk(tmp_path / "disk", monkeypatch, real=request.param == "tmpfs")
    yield disk
    disk.close()


@pytest.fixture
def checkpoint(tmp_path):
    return str(save_checkpoint(tmp_path / "micro.pth", micro_sam()))  # the fastest model to load and run


def _inputs(folder: Path, suffix: str) -> tuple[Path, list[str]]:
    """A small image (2D for .png, else a 3D volume) with a bright disk, and a click on it."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :64]
    disk = ((yy - 24) ** 2 + (xx - 30) ** 2 < 100) * 150
    if suffix == ".png":
        path = folder / "image.png"
        sitk.WriteImage(sitk.GetImageFromArray((rng.integers(0, 60, (48, 64)) + disk).astype(np.uint8)), str(path))
        return path, ["--point", "30", "24"]
    path = folder / "volume.nrrd"
    voxels = (rng.integers(0, 60, (6, 48, 64)) + disk).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path))
    return path, ["--point", "30", "24", "3"]


def _previous_mask(path: Path, suffix: str) -> bytes:
    slices = 1 if suffix == ".png" else 6
    mask = np.zeros((slices, 48, 64), bool)
    mask[:, 5:9, 5:9] = True
    write_mask(mask, IDENTITY, path)
    os.chmod(path, 0o640)
    return path.read_bytes()


@pytest.mark.parametrize("suffix", MASK_SUFFIXES)
def test_full_disk_keeps_the_previous_mask_and_says_so(tmp_path, full_disk, checkpoint, capsys, suffix):
    source, prompt = _inputs(tmp_path, suffix)
    target = full_disk.folder / f"mask{suffix}"
    before = _previous_mask(target, suffix)
    full_disk.fill()

    code = main(["segment", str(source), "-c", checkpoint, *prompt, "-o", str(target), "--device", "cpu"])

    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert error.startswith(f"ultrasam: error: {target}: could not be written") and "unchanged" in error
    assert target.read_bytes() == before and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert full_disk.files() == {target.name}  # no temporary file left


def test_full_disk_for_the_report_keeps_mask_and_report(tmp_path, full_disk, checkpoint, capsys):
    """The mask and its report replace the old pair together, or neither does."""
    source, prompt = _inputs(tmp_path, ".nrrd")
    mask, report = tmp_path / "mask.nrrd", full_disk.folder / "report.json"
    mask_before = _previous_mask(mask, ".nrrd")
    report.write_text('{"previous": true}')
    full_disk.fill()

    code = main(["segment", str(source), "-c", checkpoint, *prompt, "-o", str(mask), "--report", str(report),
                 "--device", "cpu"])

    assert code == 2 and str(report) in capsys.readouterr().err
    assert mask.read_bytes() == mask_before and report.read_text() == '{"previous": true}'
    assert full_disk.files() == {"report.json"} and sorted(p.name for p in tmp_path.glob(".mask*")) == []


def test_full_disk_while_checkpointing_is_one_line_naming_the_file(full_disk, tiny_sam):
    target = full_disk.folder / "best.pth"
    target.write_bytes(b"previous checkpoint")
    full_disk.fill()

    with pytest.raises(WriteError) as caught:
        save_checkpoint(target, tiny_sam)

    message = str(caught.value)
    assert message.startswith(f"{target}: could not be written") and "\n" not in message
    assert "the writer stopped" in message and "is the disk full?" in message
    assert target.read_bytes() == b"previous checkpoint" and full_disk.files() == {"best.pth"}


def test_full_disk_for_text_names_the_file(full_disk):
    target = full_disk.folder / "metrics.json"
    target.write_text("old")
    full_disk.fill()
    with pytest.raises(WriteError, match=rf"^{target}: could not be written \(No space left on device \[Errno 28\]\)"):
        write_text_atomic(target, "new" * 10000)
    assert target.read_text() == "old" and full_disk.files() == {"metrics.json"}


def test_full_disk_while_logging_metrics_names_the_file(full_disk):
    from ultrasam_training.runlog import RunLog, read_records

    if not full_disk.real:
        pytest.skip("appends are only failed by a real full disk")
    log = RunLog(full_disk.folder, tensorboard=False)
    log.write("start", 0, steps=1)
    full_disk.fill()
    with pytest.raises(WriteError, match=rf"^{full_disk.folder / 'metrics.jsonl'}: could not be written \(No space"):
        for step in range(10000):  # the stream's buffer first, then the disk
            log.write("train", step, total=1.0)
    assert read_records(log.path)[0]["kind"] == "start"


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_outputs_follow_the_umask_and_keep_an_existing_mode(tmp_path, tiny_sam, umask_027):
    mask = np.zeros((2, 8, 8), bool)
    mask[:, 2:5, 2:5] = True
    geometry = IDENTITY
    fresh = [write_mask(mask, geometry, tmp_path / "new.nii.gz"), save_checkpoint(tmp_path / "new.pth", tiny_sam)]
    write_text_atomic(tmp_path / "new.json", "{}")
    fresh.append(tmp_path / "new.json")
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in fresh} == {p.name: "0o640" for p in fresh}

    kept = tmp_path / "shared.nrrd"
    kept.write_bytes(b"old")
    os.chmod(kept, 0o644)
    write_mask(mask, geometry, kept)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o644 and kept.read_bytes() != b"old"


def _no_inference(monkeypatch):
    import ultrasam.batch
    import ultrasam.cli

    monkeypatch.setattr(ultrasam.cli, "predictor_from_args", lambda args: pytest.fail("the model was loaded"))
    monkeypatch.setattr(ultrasam.batch, "segment_volume", lambda *a, **k: pytest.fail("inference started"))


@pytest.mark.parametrize("output, expected", [
    ("mask.png", "PNG holds one 2D mask; this one has 6 slices"),
    ("mask.jpg", "cannot write a mask as '.jpg'"),
    ("a_file/mask.nii.gz", "is not a folder"),
    ("a_folder.nii.gz", "it is a folder"),
])
def test_outputs_are_checked_before_inference(tmp_path, monkeypatch, capsys, output, expected):
    source, prompt = _inputs(tmp_path, ".nrrd")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder.nii.gz").mkdir()
    _no_inference(monkeypatch)
    assert main(["segment", str(source), "-c", "unused.pth", *prompt, "-o", str(tmp_path / output)]) == 2
    assert expected in capsys.readouterr().err


def test_unwritable_report_is_refused_before_inference(tmp_path, monkeypatch, capsys):
    source, prompt = _inputs(tmp_path, ".nrrd")
    (tmp_path / "a_file").write_text("")
    _no_inference(monkeypatch)
    assert main(["segment", str(source), "-c", "unused.pth", *prompt, "-o", str(tmp_path / "m.nrrd"),
                 "--report", str(tmp_path / "a_file" / "r.json")]) == 2
    assert "r.json: could not be written" in capsys.readouterr().err


def test_cli_refuses_reversed_boxes_like_the_python_api(tmp_path, monkeypatch, capsys):
    source, _ = _inputs(tmp_path, ".png")
    _no_inference(monkeypatch)
    assert main(["segment", str(source), "-c", "unused.pth", "--box", "50", "40", "10", "5",
                 "-o", str(tmp_path / "m.png")]) == 2
    assert "--box must be X0 Y0 X1 Y1" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_ctrl_c_in_process_is_a_message_and_exit_130(tmp_path, monkeypatch, capsys):
    import ultrasam.batch
    import ultrasam.cli

    source, prompt = _inputs(tmp_path, ".nrrd")
    monkeypatch.setattr(ultrasam.cli, "predictor_from_args", lambda args: (None, "stub"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ultrasam.batch, "segment_volume", interrupted)
    assert main(["segment", str(source), *prompt, "-o", str(tmp_path / "m.nrrd")]) == 130
    error = capsys.readouterr().err
    assert "interrupted" in error and "Traceback" not in error and not (tmp_path / "m.nrrd").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_during_propagation_prints_no_traceback(tmp_path, checkpoint):
    """A real SIGINT while the shipped RESECT volume is being propagated: exit 130, one message."""
    target = tmp_path / "mask.nii.gz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "ultrasam.cli", "segment", str(SAMPLE_VOLUME), "-c", checkpoint, "--point",
         "140", "128", "144", "--propagate", "--min-iou", "-100", "--max-growth", "1000", "-o", str(target),
         "--device", "cpu"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        preexec_fn=_sigint_as_in_a_terminal)
    seen = []
    for line in process.stderr:  # the model line comes once the run is inside main's handlers
        seen.append(line)
        if line.startswith("model:"):
            process.send_signal(signal.SIGINT)
            break
    rest = process.communicate(timeout=300)[1]
    assert process.returncode == 130, "".join(seen) + rest
    assert "interrupted" in rest and "Traceback" not in rest and not target.exists()


def _sigint_as_in_a_terminal() -> None:
    """A job started in the background without job control (``cmd &`` in a script) inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt; Ctrl+C in a terminal has it default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
