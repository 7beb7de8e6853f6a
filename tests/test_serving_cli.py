"""`minigem serve` as a user runs it: a subprocess on 127.0.0.1 with the key from the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from minigem.serving.testing import free_port, tiny_checkpoint


def test_serve_command(tmp_path):
    port = free_port()
    env = {**os.environ, "MINIGEM_API_KEY": "k3y"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "minigem.cli", "serve", "--model", str(tiny_checkpoint()),
         "--port", str(port), "--threads", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert health["model"] == "tiny" and health["auth_required"] is True
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer k3y"}, timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "tiny"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_bad_port_is_a_clear_error():
    r = subprocess.run([sys.executable, "-m", "minigem.cli", "serve", "--port", "70000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: --port must be in 1..65535" in r.stderr
    assert "Traceback" not in r.stderr
