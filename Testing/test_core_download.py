"""The official-weights download against a local HTTP server: progress, resume, integrity check.

The served file is in UltraSam.pth's exact layout, written with the real mmengine package
(``ultrasam_layout``), so a download is accepted only if the loader reads what mmengine writes.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ultrasam.checkpoint import CheckpointError
from ultrasam.cli import main
from ultrasam.download import OFFICIAL_NAME, cached_official_weights, download_official_weights
from ultrasam_layout import save_ultrasam_checkpoint


class _Server:
    """Serves ``body`` on 127.0.0.1 with HTTP Range support; can cut the first reply short."""

    def __init__(self, body: bytes, cut_first_at: int | None = None):
        self.body, self.cut_first_at, self.ranges = body, cut_first_at, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                server.ranges.append(start)
                payload = server.body[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if server.cut_first_at is not None and len(server.ranges) == 1:
                    payload = payload[: server.cut_first_at]  # connection drops mid-file
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{OFFICIAL_NAME}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_resumes_an_interrupted_download(tmp_path, tiny_sam):
    source = tmp_path / "source.pth"
    save_ultrasam_checkpoint(tiny_sam.state_dict(), source)
    body = source.read_bytes()
    server = _Server(body, cut_first_at=len(body) // 3)
    cache = tmp_path / "cache"
    try:
        with pytest.raises(Exception):
            download_official_weights(cache, url=server.url, progress=False)
        assert not (cache / OFFICIAL_NAME).exists()  # never a half file under the final name
        path = download_official_weights(cache, url=server.url, progress=False)
    finally:
        server.close()
    assert path.read_bytes() == body
    assert server.ranges == [0, len(body) // 3]  # the second request asked only for the rest
    assert sorted(p.name for p in cache.iterdir()) == [OFFICIAL_NAME]


def test_download_command_fetches_checks_and_keeps_ultrasam_weights(tmp_path, tiny_sam, capsys, monkeypatch):
    source = tmp_path / "served.pth"
    save_ultrasam_checkpoint(tiny_sam.state_dict(), source)
    server = _Server(source.read_bytes())
    cache = tmp_path / "cache"
    try:
        assert main(["download", "--cache-dir", str(cache), "--url", server.url]) == 0
    finally:
        server.close()
    kept = cache / OFFICIAL_NAME
    assert capsys.readouterr().out.strip() == str(kept)
    assert kept.read_bytes() == source.read_bytes() and list(cache.iterdir()) == [kept]
    monkeypatch.setenv("ULTRASAM_CACHE", str(cache))
    assert cached_official_weights() == kept  # what segment/demo/Slicer pick up by default
    assert main(["info", str(kept)]) == 0
    output = capsys.readouterr().out
    assert f"{kept}: ultrasam checkpoint" in output and "postprocess: ultrasam" in output


def test_rejects_a_file_that_is_not_ultrasam(tmp_path):
    server = _Server(b"<html>error page</html>")
    try:
        with pytest.raises(CheckpointError, match="not usable.*removed"):
            download_official_weights(tmp_path, url=server.url, progress=False)
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_says_what_to_do(tmp_path):
    with pytest.raises(ConnectionError, match="--checkpoint"):
        download_official_weights(tmp_path, url="http://127.0.0.1:9/UltraSam.pth", progress=False)


def test_progress_callback_and_cancel(tmp_path, tiny_sam):
    source = tmp_path / "source.pth"
    save_ultrasam_checkpoint(tiny_sam.state_dict(), source)
    body = source.read_bytes()
    server = _Server(body)
    seen = []
    try:
        with pytest.raises(InterruptedError, match="cancelled"):
            download_official_weights(tmp_path / "c", url=server.url, progress=lambda r, t: seen.append((r, t)),
                                      should_cancel=lambda: len(seen) >= 2)
        assert not (tmp_path / "c" / OFFICIAL_NAME).exists()
        path = download_official_weights(tmp_path / "c", url=server.url, progress=lambda r, t: seen.append((r, t)))
    finally:
        server.close()
    assert path.read_bytes() == body
    assert seen[-1] == (len(body), len(body)) and all(t == len(body) for _, t in seen)


def test_download_through_a_pipe_prints_only_its_result(tmp_path, tiny_sam):
    """The Slicer module runs the download as a child whose output goes to a pipe it reads only once
    the child exits (UltraSamSlicerLib.engine.start_download): no progress bar may fill that pipe."""
    import subprocess
    import sys

    from ultrasam.client import child_environment

    source = tmp_path / "served.pth"
    save_ultrasam_checkpoint(tiny_sam.state_dict(), source)
    server = _Server(source.read_bytes())
    cache = tmp_path / "cache"
    try:
        completed = subprocess.run(
            [sys.executable, "-m", "ultrasam.cli", "download", "--cache-dir", str(cache), "--url", server.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=child_environment(), timeout=120)
    finally:
        server.close()
    assert completed.returncode == 0, completed.stdout
    assert completed.stdout.strip() == str(cache / OFFICIAL_NAME)
