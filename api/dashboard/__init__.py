"""The built-in dashboard: static HTML/JS/CSS served by the API itself at `/dashboard` (issue 6).

No build step and no CDN (the machines have no internet): plain ES2020 modules-free JavaScript plus a vendored
Chart.js UMD file (`static/vendor/`, MIT, its LICENSE next to it). The page asks for an API key once, keeps it
in `sessionStorage`, and sends it as `Authorization: Bearer` on every call -- including the SSE stream, which it
reads with `fetch()` + a stream reader because `EventSource` cannot send headers; keys never go into URLs.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
router = APIRouter(tags=["dashboard"], include_in_schema=False)


@router.get("/dashboard")
def dashboard() -> FileResponse:
    # no-store: a new deployment's page must not run against a cached older script.
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"})


@router.get("/dashboard/")
def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=307)


def install(app: FastAPI) -> None:
    assert (STATIC / "index.html").is_file(), f"dashboard files missing under {STATIC}"
    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")
