"""`ultrasam serve` as a real child process on 127.0.0.1, driven by the client Slicer and the CLI use.

The model is the compact one shipped with the package (CPU, a few milliseconds per slice). The
reference for masks is the core run in this process (`ultrasam.batch.segment_volume`), so a test
fails if the wire loses geometry or slices; the robustness tests send what a broken or hostile
client would, and check both the 4xx answer and that the server still segments afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import zlib

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "UltraSamSlicer"))
from server_helpers import (NEVER_STOP, centre_click, finish, identity_geometry, skip_without_server_packages,  # noqa: E402
                            start_server, tube_volume)
from ultrasam.client import Client, ServerError, ServerGone  # noqa: E402
# compact-v1: its encoder is ~75x faster on a CPU than the default's; these tests are about the server.
from ultrasam.resources import COMPACT_V1_MODEL as FAST_MODEL  # noqa: E402
from ultrasam.wire import WireError, apply_slices, decode_volume, encode_slices, encode_volume  # noqa: E402

pytestmark = pytest.mark.skipif(not FAST_MODEL.is_file(), reason="the compact-v1 model file is not installed")


@pytest.fixture(scope="module")
def server():
    server = start_server(FAST_MODEL, "--max-upload-mib", "1")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def predictor():
    """The server's model, in this process."""
    from ultrasam.checkpoint import load_model
    from ultrasam.predictor import Predictor

    loaded = load_model(FAST_MODEL)
    return Predictor(loaded.model, device="cpu", mode=loaded.info["postprocess"])


def reference(predictor, voxels, prompts, propagate):
    """The core's own (mask, report) in this process, for the same model, volume and prompts."""
    from ultrasam.batch import segment_volume
    from ultrasam.geometry import Geometry, Volume
    from ultrasam.prompts3d import VolumePrompts
    from ultrasam.propagation import StopRules

    volume = Volume(voxels, Geometry(*identity_geometry()))
    volume_prompts = VolumePrompts(prompts["points"], prompts["labels"], prompts["frame"])
    return segment_volume(volume, predictor, volume_prompts, 0, propagate, rules=StopRules(**NEVER_STOP))


def test_a_click_and_a_propagation_give_the_cores_masks_and_send_only_changed_slices(server, predictor):
    voxels = tube_volume(9)
    session = server.client.open_volume(voxels, *identity_geometry(), "tube")
    click = session.start(centre_click(voxels), rules=NEVER_STOP, wait=5.0)
    assert click.state == "done" and click.summary.startswith("1 slice(s) segmented")
    np.testing.assert_array_equal(session.mask, reference(predictor, voxels, centre_click(voxels), propagate=False)[0])

    session.start(centre_click(voxels), propagate=True, rules=NEVER_STOP)
    answer = server.client.request("GET", f"/sessions/{session.id}/run?base={session.version}&wait=5")
    assert answer["state"] == "done"
    assert 4 not in answer["masks"]["indices"]  # the clicked slice did not change: not sent again
    session._take(answer)
    np.testing.assert_array_equal(session.mask, reference(predictor, voxels, centre_click(voxels), propagate=True)[0])
    full = server.client.request("GET", f"/sessions/{session.id}/mask")
    np.testing.assert_array_equal(apply_slices(np.zeros_like(session.mask), full["masks"]), session.mask)
    session.close()


def test_blank_volumes_are_refused_and_blank_slices_left_empty_with_the_cores_warnings(server, predictor):
    voxels = tube_volume(9)
    voxels[6:] = 0  # the end of the sweep: no signal
    session = server.client.open_volume(voxels, *identity_geometry(), "tube")
    session.start(centre_click(voxels), propagate=True, rules=NEVER_STOP)
    state = finish(session)
    mask, report = reference(predictor, voxels, centre_click(voxels), propagate=True)
    assert mask[:6].any(axis=(1, 2)).all() and not mask[6:].any()
    np.testing.assert_array_equal(session.mask, mask)
    assert "slice(s) [6] are blank (a single grey value) and were left empty" in report["warnings"]
    assert list(state.warnings) == report["warnings"]
    session.close()
    with pytest.raises(ServerError) as error:
        server.client.open_volume(np.zeros((3, 8, 8), np.uint8), *identity_geometry(), "blank")
    assert error.value.status == 422 and "every voxel has the value 0 (a blank image)" in str(error.value)


def test_bad_requests_get_a_4xx_that_says_what_to_do_and_the_server_keeps_serving(server):
    client = server.client
    voxels = tube_volume(3)
    session = client.open_volume(voxels, *identity_geometry())
    cases = {
        "garbage volume": ("POST", "/sessions", b"\x00garbage" * 10, 400, "not a volume body"),
        "oversized body": ("POST", "/sessions", b"\x00" * (2 << 20), 413, "exceeds the limit"),
        "zip bomb": ("POST", "/sessions", _bomb(), 400, "needs 512"),
        "garbage json": ("POST", f"/sessions/{session.id}/run", b"{not json", 400, "not JSON"),
        "bad run": ("POST", f"/sessions/{session.id}/run", {"prompts": {"points": [[1, 2]]}}, 400,
                    "not a valid run request"),
        "unknown session": ("GET", "/sessions/nope/run", None, 404, "open the volume again"),
        "unknown operation": ("GET", "/etc/passwd", None, 404, "no operation"),
    }
    for name, (method, path, body, status, words) in cases.items():
        with pytest.raises(ServerError) as error:
            client.request(method, path, body)
        assert error.value.status == status and words in str(error.value), name
    with pytest.raises(ServerError) as error:
        Client(client.url, token="wrong").info()
    assert error.value.status == 401 and "token" in str(error.value)
    with pytest.raises(ServerError) as error:
        Client(client.url, token="").info()  # no token at all
    assert error.value.status == 401

    assert session.start(centre_click(voxels), wait=5.0).state == "done"  # still serving
    assert session.mask.any()


def test_two_clients_on_two_volumes_at_once_each_get_their_own_mask(server):
    url, token = server.client.url, server.client._token
    volumes = [tube_volume(30, offset=1), tube_volume(24, size=48, offset=2)]
    sessions = [Client(url, token).open_volume(v, *identity_geometry()) for v in volumes]
    for session, voxels in zip(sessions, volumes):
        session.start(centre_click(voxels), propagate=True, rules=NEVER_STOP)
    assert all(s.running for s in sessions)  # both runs are under way together
    for session in sessions:
        assert finish(session).state == "done"
    for session, voxels in zip(sessions, volumes):  # each alone, afterwards: the same masks
        alone = Client(url, token).open_volume(voxels, *identity_geometry())
        alone.start(centre_click(voxels), propagate=True, rules=NEVER_STOP)
        finish(alone)
        assert alone.mask.any()
        np.testing.assert_array_equal(session.mask, alone.mask)


def test_kill_9_mid_propagation_loses_nothing_and_the_module_logic_restarts_the_server(tmp_path):
    skip_without_server_packages()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "UltraSamSlicer"))
    from UltraSamSlicerLib.engine import EngineConnection
    from UltraSamSlicerLib.models import ModelSettings

    settings = ModelSettings(checkpoint=str(FAST_MODEL), device="cpu")
    engine = EngineConnection(sys.executable)
    assert engine.client(settings) is None and engine.starting  # started, not waited for
    client = _ready(engine, settings)
    voxels = tube_volume(400)
    session = client.open_volume(voxels, *identity_geometry())
    session.start(centre_click(voxels), rules=NEVER_STOP, wait=5.0)
    clicked = session.mask.copy()
    assert clicked.any()
    state = session.start(centre_click(voxels), propagate=True, rules=NEVER_STOP)
    for _ in range(200):  # let it get going
        if state.progress[0] > 2:
            break
        time.sleep(0.02)
        state = session.poll()
    assert state.state == "running"
    process = engine.local.process
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    with pytest.raises(ServerGone, match="no answer from the UltraSam server"):
        session.poll()
    assert "server stopped" in engine.lost() and "killed" in engine.lost()
    crash_log = engine.local.log_path
    assert crash_log in engine.lost() and os.path.exists(crash_log)  # kept for the user to read
    np.testing.assert_array_equal(session.mask, clicked)  # the client's mask is the last good one

    assert engine.client(settings) is None and engine.starts == 2  # the next call starts a new one
    client = _ready(engine, settings)
    session = client.open_volume(voxels[:12], *identity_geometry())
    assert session.start(centre_click(voxels[:12]), rules=NEVER_STOP, wait=5.0).state == "done"
    assert session.mask.any()

    clean_log = engine.local.log_path
    engine.stop()
    assert engine.local is None and process.poll() is not None
    assert os.path.exists(crash_log) and not os.path.exists(clean_log)  # a clean stop leaves no litter
    os.remove(crash_log)
    with pytest.raises(ServerGone):
        client.info()


def test_a_server_beyond_loopback_refuses_to_start_without_a_token(monkeypatch, capsys):
    from ultrasam import server as server_module
    from ultrasam.cli import main

    monkeypatch.delenv("ULTRASAM_TOKEN", raising=False)
    monkeypatch.setattr(server_module, "serve", lambda *args, **kwargs: pytest.fail("it served"))
    assert main(["serve", "--host", "0.0.0.0", "--checkpoint", str(FAST_MODEL)]) == 2
    error = capsys.readouterr().err
    assert "--host 0.0.0.0" in error and "give a token" in error and "Traceback" not in error
    assert main(["serve", "--host", "::1", "--checkpoint", "/nonexistent.pth"]) == 2  # loopback: no token needed
    assert "give a token" not in capsys.readouterr().err  # (it got as far as the missing checkpoint)

def test_tokens_are_compared_in_constant_time_and_no_operation_touches_a_named_file(monkeypatch, tmp_path,
                                                                                    predictor):
    # In-process app (Starlette's test client), so that every compare and every file open is seen.
    from fastapi.testclient import TestClient

    from ultrasam import server as server_module
    from ultrasam.volume_embeddings import VolumeEmbeddingCache

    engine = server_module.Engine(VolumeEmbeddingCache(predictor), "m")
    compared = []
    real_compare = server_module.hmac.compare_digest
    monkeypatch.setattr(server_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real_compare(a, b))
    app = TestClient(server_module.create_app(engine, token="secret"))
    headers = {"Authorization": "Bearer secret"}
    assert app.get("/info", headers={"Authorization": "Bearer secreT"}).status_code == 401
    named = tmp_path / "victim.nii.gz"
    voxels = tube_volume(3)
    body = encode_volume(voxels, *identity_geometry(), name=str(named))

    opened = []
    sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" and _watching else None)
    _set_watching(True)
    try:
        session = app.post("/sessions", content=body, headers=headers).json()["session"]
        request = {"prompts": centre_click(voxels), "wait": 5, "base": 0}
        assert app.post(f"/sessions/{session}/run", json=request, headers=headers).json()["state"] == "done"
        app.get(f"/sessions/{session}/mask", headers=headers)
        app.delete(f"/sessions/{session}", headers=headers)
    finally:
        _set_watching(False)
    assert len(compared) >= 5  # every request went through hmac.compare_digest
    touched = [str(path) for path in opened if isinstance(path, (str, bytes, os.PathLike))]
    assert not [path for path in touched if "victim" in path or str(tmp_path) in path], touched
    assert not named.exists()
    engine.shutdown()


def test_volumes_travel_exactly_and_a_zip_bomb_is_refused_before_it_inflates():
    voxels = (np.arange(4 * 5 * 6) * 37 % 251).astype(np.int16).reshape(4, 5, 6)
    header, decoded = decode_volume(encode_volume(voxels, [1, 2, 3], [0.5, 0.6, 0.7], np.eye(3), "v"), 1 << 20)
    np.testing.assert_array_equal(decoded, voxels)
    assert header["spacing"] == [0.5, 0.6, 0.7] and header["name"] == "v"
    with pytest.raises(WireError, match="hold 513 bytes"):  # inflating stopped one byte past the claim
        decode_volume(_bomb(), 1 << 20)
    with pytest.raises(WireError, match="exceeds the server's limit"):
        decode_volume(encode_volume(np.zeros((64, 64, 64), np.uint8), *identity_geometry()), 1 << 16)
    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1:3, 2:4, 1] = 1
    payload = encode_slices(mask, 2, [1, 3])
    assert json.loads(json.dumps(payload)) == payload  # plain JSON
    np.testing.assert_array_equal(apply_slices(np.zeros_like(mask), payload), mask)


_watching = False


def _set_watching(value: bool) -> None:
    global _watching
    _watching = value


def _bomb() -> bytes:
    """A valid header claiming 512 voxels, whose 4 kB zlib stream inflates to 4 MiB."""
    import struct

    header = json.dumps({"shape": [8, 8, 8], "dtype": "uint8"}).encode()
    return b"USV1" + struct.pack("<I", len(header)) + header + zlib.compress(b"\x00" * (4 << 20))


def _ready(engine, settings, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        client = engine.client(settings)
        if client is not None:
            return client
        time.sleep(0.05)
    raise AssertionError(f"the server did not start: {engine.local.log_tail()}")


def test_volumes_past_the_first_mib_travel_exactly_compressed_when_it_pays_and_stored_when_not():
    rng = np.random.default_rng(0)
    smooth = (np.indices((24, 256, 256)).sum(axis=0) % 256).astype(np.uint8)  # 1.5 MiB, compresses well
    noise = rng.integers(0, 256, (24, 256, 256), dtype=np.uint8)  # does not compress
    for voxels, most_bytes in ((smooth, smooth.nbytes // 10), (noise, noise.nbytes + 1024)):
        body = encode_volume(voxels, *identity_geometry())
        header_end = 8 + int.from_bytes(body[4:8], "little")
        assert zlib.decompress(body[header_end:]) == voxels.tobytes()  # one valid zlib stream
        np.testing.assert_array_equal(decode_volume(body, 1 << 30)[1], voxels)
        assert len(body) <= most_bytes
    assert len(encode_volume(noise, *identity_geometry())) >= noise.nbytes  # stored, not deflated


def test_urllib_plain_clients_can_read_info(server):
    # Any HTTP client will do (curl, a browser): the info answer is plain JSON.
    request = urllib.request.Request(server.client.url + "/info",
                                     headers={"Authorization": f"Bearer {server.client._token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.loads(answer.read())["server"] == "ultrasam"


def test_the_command_line_segments_on_a_server_as_it_does_here(server, tmp_path, monkeypatch):
    import SimpleITK as sitk

    from ultrasam.cli import main
    from ultrasam.volume_io import read_volume

    image = tmp_path / "tube.nii.gz"
    written = sitk.GetImageFromArray(tube_volume(9))
    written.SetSpacing((0.8, 0.8, 1.5))
    written.SetOrigin((3.0, -2.0, 1.0))
    sitk.WriteImage(written, str(image))
    assert set(np.unique(read_volume(image).voxels)) == {30, 200}
    monkeypatch.setenv("ULTRASAM_TOKEN", server.client._token)
    common = [str(image), "--point", "32", "32", "4", "--propagate", "--min-iou", "-10", "--max-growth", "1e9"]
    assert main(["segment", *common, "-o", str(tmp_path / "here.nii.gz"), "-c", str(FAST_MODEL),
                 "--device", "cpu"]) == 0
    assert main(["segment", *common, "-o", str(tmp_path / "served.nii.gz"), "--server", server.client.url,
                 "--report", str(tmp_path / "served.json")]) == 0
    here, served = (read_volume(tmp_path / name).voxels for name in ("here.nii.gz", "served.nii.gz"))
    assert served.any()
    np.testing.assert_array_equal(served, here)
    report = json.loads((tmp_path / "served.json").read_text())
    assert report["segmented_slices"] == list(range(9)) and report["key_slices"] == [4]

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"volume": "tube.nii.gz", "frame": "ijk", "points": [[32, 32, 4]]}]))
    assert main(["batch", str(prompts), "--output-dir", str(tmp_path / "batch"), "--server", server.client.url,
                 "--propagate", "--min-iou", "-10", "--max-growth", "1e9"]) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "batch" / "tube_mask.nii.gz").voxels, here)
    assert main(["segment", *common, "-o", str(tmp_path / "x.nii.gz"), "--server", server.client.url,
                 "-c", str(FAST_MODEL)]) == 2  # the server's model is the one that runs: said, not ignored


def test_the_slicer_side_and_the_client_import_no_model_code():
    # What Slicer's process loads to segment: the effect's non-Qt imports, the engine connection,
    # the client. None may pull torch or segment_anything in (the model lives in the server).
    # (Under make test-compat, where none of these is installed, the imports alone show it.)
    import importlib.util

    root = os.path.dirname(os.path.dirname(__file__))
    modules = ["ultrasam.client", "ultrasam.wire", "UltraSamSlicerLib.engine", "UltraSamSlicerLib.models"]
    if importlib.util.find_spec("vtk") and importlib.util.find_spec("slicer"):  # the Slicer wheels
        modules.append("UltraSamSlicerLib.mrml_bridge")
    code = (f"import sys; import {', '.join(modules)}; "
            "print(sorted(m for m in ('torch', 'segment_anything', 'fastapi') if m in sys.modules))")
    path = os.pathsep.join([os.path.join(root, "UltraSamSlicer"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_volume_sent_in_chunks_opens_the_same_session_as_one_upload(server):
    from ultrasam.client import RemoteSession, VolumeUpload

    client = server.client
    voxels = (tube_volume(12, offset=5).astype(np.int16) * 3 - 100)  # 2-byte voxels: chunks split slices
    one_shot = client.request("POST", "/sessions", encode_volume(voxels, *identity_geometry()))
    whole = RemoteSession(client, one_shot["session"], voxels.shape)
    upload = VolumeUpload(client, voxels, *identity_geometry(), chunk_bytes=10_000)
    sent, progress = [], []
    original_request = client.request

    def recording(method, path, body=None, timeout=None):
        if path.startswith(f"/uploads/{upload.id}"):
            sent.append(json.loads(body[8:8 + int.from_bytes(body[4:8], "little")]))
        return original_request(method, path, body, timeout)

    client.request = recording
    try:
        while upload.step() is None:
            progress.append(upload.progress)
    finally:
        client.request = original_request
    assert all(chunk["count"] <= 5_000 for chunk in sent)  # each step sends at most chunk_bytes of voxels
    assert [chunk["offset"] for chunk in sent] == list(range(0, voxels.size, 5_000))
    assert progress == sorted(progress) and progress[0] == 0.0 and len(sent) == len(progress) == 10  # + header
    for session in (whole, upload.session):
        session.start(centre_click(voxels), propagate=True, rules=NEVER_STOP)
        assert finish(session).state == "done"
    assert whole.mask.any()
    np.testing.assert_array_equal(upload.session.mask, whole.mask)


def test_bad_chunks_get_a_4xx_that_says_what_to_do_and_the_server_keeps_serving(server):
    from ultrasam.client import VolumeUpload
    from ultrasam.wire import encode_chunk

    client = server.client
    voxels = tube_volume(4)
    flat = voxels.reshape(-1)
    header = {"shape": list(voxels.shape), "dtype": "uint8"}
    begun = client.request("POST", "/uploads", header)
    path, total = f"/uploads/{begun['upload']}", begun["total"]
    assert total == voxels.size
    client.request("POST", path, encode_chunk(flat, 0, 1000))
    cases = {
        "2-D header": ("/uploads", {"shape": [4, 4], "dtype": "uint8"}, 400, "(K, J, I)"),
        "too large": ("/uploads", {"shape": [64, 1024, 1024], "dtype": "uint8"}, 400, "--max-upload-mib"),
        "duplicate": (path, encode_chunk(flat, 0, 1000), 409, "received already: send the chunk at voxel 1000"),
        "out of order": (path, encode_chunk(flat, 2000, 1000), 409, "ahead of the next one: send the chunk at "
                                                                    "voxel 1000"),
        "wrong dtype": (path, encode_chunk(flat.astype(np.int16), 1000, 1000), 400, "uint8 voxels"),
        "past the end": (path, encode_chunk(np.zeros(total + 5, np.uint8), 1000, total), 400, "past the volume's"),
        "garbage": (path, b"\x00garbage" * 10, 400, "not a volume body"),
        "unknown upload": ("/uploads/nope", encode_chunk(flat, 0, 10), 404, "begin the upload again"),
    }
    for name, (where, body, status, words) in cases.items():
        with pytest.raises(ServerError) as error:
            client.request("POST", where, body)
        assert error.value.status == status and words in str(error.value), name
    client.request("POST", path, encode_chunk(flat, 1000, total))  # the rest, after all that
    with pytest.raises(ServerError) as error:  # it became a session: the upload is gone
        client.request("POST", path, encode_chunk(flat, 0, 10))
    assert error.value.status == 404

    cancelled = VolumeUpload(client, voxels, *identity_geometry(), chunk_bytes=1000)
    cancelled.step(), cancelled.step()
    cancelled_id = cancelled.id
    cancelled.cancel()
    with pytest.raises(ServerError, match="begin the upload again"):
        client.request("POST", f"/uploads/{cancelled_id}", encode_chunk(flat, 1000, 1000))

    session = client.open_volume(voxels, *identity_geometry())  # still serving
    assert session.start(centre_click(voxels), wait=5.0).state == "done" and session.mask.any()


def test_unfinished_uploads_hold_session_memory_until_they_expire():
    from ultrasam.server import ApiError, Engine, Limits

    engine = Engine(cache=None, description="no model needed", limits=Limits(session_bytes=100_000, idle_seconds=60))
    header = {"shape": [10, 50, 50], "dtype": "uint8"}  # 25,000 voxels: 100,000 bytes of session memory
    upload_id = engine.begin_upload(header)["upload"]
    with pytest.raises(ApiError) as error:  # the first one's room is reserved
        engine.begin_upload(header)
    assert error.value.status == 503
    engine.pending(upload_id).last_used -= 61
    assert engine.expire_idle() == [upload_id] and not engine.uploads
    assert engine.begin_upload(header)["total"] == 25_000
