"""``POST /v1/explain`` (minigem extension, Mini-Gemini models only): answer a question about
one image and return the patch-mining heat map (a PNG data: URL) and the LR tokens the answer
relied on most (see ``minigem.explain``).

The image comes as in chat completions (a data: URL, or http(s) when the server allows
remote images). A model without a patch-mining connector answers 400
``explain_unavailable`` (``/health`` says ``mining: false``). Explaining runs one generation
and one teacher-forced forward outside the batching engine, holding the engine's
``model_lock`` so no decode step overlaps it (other requests wait for that time).
"""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from minigem.explain import explain, has_mining, render, require_mining
from minigem.serving.chat import check_model
from minigem.serving.errors import bad_request
from minigem.serving.imagegen import png_base64
from minigem.serving.images import load_image
from minigem.serving.schemas import ExplainRequest, ExplainResponse, ImageURL
from minigem.serving.settings import ServeSettings


def unavailable(model):
    try:
        require_mining(model, "this server's model")
    except ValueError as err:
        return bad_request(str(err), None, "explain_unavailable")
    return bad_request("explain is not available for this model", None, "explain_unavailable")


def _gen(body: ExplainRequest, settings: ServeSettings) -> dict:
    if body.max_tokens is not None and body.max_tokens > settings.max_tokens_limit:
        raise bad_request(f"max_tokens: {body.max_tokens} is over this server's limit of "
                          f"{settings.max_tokens_limit}", "max_tokens")
    return {"max_new_tokens": body.max_tokens or settings.default_max_tokens,
            # below 0.01 the scaled logits overflow softmax: such settings mean greedy anyway
            "temperature": 0.0 if body.temperature < 0.01 else body.temperature,
            "seed": body.seed}


def run_explain(model, engine, settings: ServeSettings, body: ExplainRequest) -> ExplainResponse:
    """Decode the image, explain (holding the engine's model lock), render (a worker thread)."""
    url = body.image_url.url if isinstance(body.image_url, ImageURL) else body.image_url
    image = load_image(url, settings, "image_url")
    gen = _gen(body, settings)
    with engine.model_lock:
        ex = explain(model, image, body.question, name="this server's model", **gen)
    picture = render(ex, top_k=body.top_tokens)
    fields = ex.to_dict(body.top_tokens)
    fields.pop("question")
    return ExplainResponse(model=settings.model_name,
                           heatmap="data:image/png;base64," + png_base64(picture), **fields)


async def explain_endpoint(request: Request, body: ExplainRequest) -> ExplainResponse:
    app = request.app
    settings, engine, model = app.state.settings, app.state.engine, app.state.model
    check_model(body.model, settings.model_name)
    if not has_mining(model):
        raise unavailable(model)
    return await run_in_threadpool(run_explain, model, engine, settings, body)
