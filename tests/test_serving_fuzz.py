"""Fuzz the live API from its own OpenAPI schema (schemathesis: valid and invalid requests):
never a 5xx, every error in the OpenAI shape, and the server still answers afterwards."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import torch

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install minigem[dev])")
from hypothesis import HealthCheck, settings  # noqa: E402

from minigem.checkpoints.native import load_model  # noqa: E402
from minigem.serving.api import create_app  # noqa: E402
from minigem.serving.settings import ServeSettings  # noqa: E402
from minigem.serving.testing import LiveServer, tiny_checkpoint  # noqa: E402

ERROR_KEYS = {"message", "type", "param", "code"}
SEEN: Counter[tuple[str, int]] = Counter()  # (path, status) over all fuzzed calls


@pytest.fixture(scope="module")
def live():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    app = create_app(load_model(tiny_checkpoint()),
                     ServeSettings(model_name="tiny", max_tokens_limit=4, default_max_tokens=4,
                                   max_queue=256))
    with LiveServer(app) as srv:
        yield srv
    torch.set_num_threads(before)


# The schema depends on the app's routes only, not on a model: read it without one.
schema = schemathesis.openapi.from_dict(create_app(None).openapi())


@schema.parametrize()
@settings(max_examples=120, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, live):
    response = case.call(base_url=live.url, timeout=60)
    SEEN[case.path, response.status_code] += 1
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
        assert "Traceback" not in response.text


def test_alive_after_fuzzing(live):
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    r = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert live.app.state.engine.stats["failed"] == 0
    chat = {status: n for (path, status), n in SEEN.items() if path == "/v1/chat/completions"}
    assert chat.get(200) and chat.get(400), chat  # valid requests were generated, and invalid ones
