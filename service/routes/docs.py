"""``/docs`` (Swagger UI) and ``/redoc`` without a CDN: their scripts and styles come from this server.

FastAPI's default pages load Swagger UI and ReDoc from a public CDN, so on a robot network
without internet they are blank. The files are those of the ``fastapi-offline`` package
(Swagger UI 5 and ReDoc 2, maintained on PyPI); only its static folder is used, served
under ``/docs-assets``.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs-assets"
# The pages may load nothing from elsewhere: ReDoc's bundle links its logo from its vendor's CDN, which a browser
# then never fetches (the page works the same without it).
SAME_ORIGIN_ONLY = ("default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval' blob:; "
                    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; worker-src 'self' blob:; "
                    "connect-src 'self'; font-src 'self' data:")


def _same_origin(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = SAME_ORIGIN_ONLY
    return page


def add_docs_routes(app: FastAPI) -> None:
    """The app must be created with ``docs_url=None, redoc_url=None`` (FastAPI's CDN pages off)."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")

    async def swagger(request: Request):
        root = request.scope.get("root_path", "")
        return _same_origin(get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png"))

    async def redoc(request: Request):
        root = request.scope.get("root_path", "")
        return _same_origin(get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                                           redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                                           redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                                           with_google_fonts=False))

    app.add_api_route("/docs", swagger, methods=["GET"], include_in_schema=False)
    app.add_api_route("/docs/oauth2-redirect", get_swagger_ui_oauth2_redirect_html, methods=["GET"],
                      include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
