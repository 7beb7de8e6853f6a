"""The web UI at ``/``: one static page (``static/index.html`` + ``static/app.js``) that talks
to the same ``/v1/chat/completions`` API as any client, streaming the answer.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Cache-Control": "no-cache"}


def _static(name: str) -> str:
    return resources.files("minigem.serving").joinpath("static", name).read_text(encoding="utf-8")


def ui_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def index() -> HTMLResponse:
        return HTMLResponse(_static("index.html"), headers=HEADERS)

    @router.get("/static/app.js")
    async def app_js() -> Response:
        return Response(_static("app.js"), media_type="text/javascript", headers=HEADERS)

    return router
