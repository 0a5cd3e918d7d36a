"""SSCD downloads you can trust, against a local HTTP server: a file whose sha256 is not the expected
one is refused (the digest in the message) and never reaches the cache; transient server errors are
retried; a good file is cached once and served from the cache afterwards."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flowcurate.models import sscd


@pytest.fixture
def server(tiny_models):
    good = (tiny_models / "sscd.torchscript.pt").read_bytes()
    state = {"fail_first": 0, "body": good, "requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            state["requests"] += 1
            if state["fail_first"] > 0:
                state["fail_first"] -= 1
                self.send_error(503, "try again")
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/sscd_test.torchscript.pt", good, state
    httpd.shutdown()


@pytest.fixture
def online_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWCURATE_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("FLOWCURATE_OFFLINE", raising=False)
    monkeypatch.setattr(sscd.time, "sleep", lambda s: None)  # backoff without waiting
    return tmp_path


def test_a_corrupted_file_is_refused_with_its_digest(server, online_cache):
    url, good, state = server
    expected = hashlib.sha256(good).hexdigest()
    state["body"] = good[:-1000] + b"\0" * 1000  # substituted bytes, same length
    bad = hashlib.sha256(state["body"]).hexdigest()
    with pytest.raises(sscd.DownloadError, match=bad) as e:
        sscd.resolve_sscd(url, sha256=expected)
    assert expected in str(e.value) and "not kept" in str(e.value)
    assert not sscd.cached_path(url).exists()
    assert [p.name for p in (online_cache / "sscd").iterdir()] == []  # no partial file either


def test_transient_errors_are_retried_and_the_good_file_cached_once(server, online_cache):
    url, good, state = server
    state["fail_first"] = 2
    path = sscd.resolve_sscd(url, sha256=hashlib.sha256(good).hexdigest())
    assert path.read_bytes() == good and state["requests"] == 3
    assert sscd.resolve_sscd(url, sha256=hashlib.sha256(good).hexdigest()) == path and state["requests"] == 3
    model = sscd.load_sscd(url, sha256=hashlib.sha256(good).hexdigest())
    assert model is not None


def test_a_server_that_keeps_failing_gives_up_with_a_reason(server, online_cache):
    url, _, state = server
    state["fail_first"] = 99
    with pytest.raises(sscd.DownloadError, match="503"):
        sscd.resolve_sscd(url)
    assert state["requests"] == sscd.DOWNLOAD_ATTEMPTS and not sscd.cached_path(url).exists()
