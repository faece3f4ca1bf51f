"""The dashboard's routes, an APIRouter the gateway includes (`/dashboard...`, same port as the API).

Sessions are cookies (HttpOnly, SameSite=Strict, Path=/dashboard): the operator's is its expiry signed with a
key derived from the operator token (views.operator_session); a client's is its API key, which every request
re-authenticates with the payments actor (a revoked key signs the page out). Every POST also carries a CSRF
token bound to the session cookie. The JSON endpoints (`/dashboard/api/...`) take the same cookies or an
`Authorization: Bearer` header, and answer 401/403 in the OpenAI error format.
"""

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Form, Header, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sse_starlette.sse import EventSourceResponse

from payments.errors import PaymentError
from payments.http import bearer_key
from serve_apps.dashboard import live, reads, views
from serve_apps.gateway.errors import OpenAIError
from serve_apps.gateway.operator import require_operator

HERE = Path(__file__).parent
STATIC = {p.relative_to(HERE / "static").as_posix() for p in (HERE / "static").rglob("*") if p.is_file()}
OPERATOR_COOKIE, WALLET_COOKIE = "slm_operator", "slm_wallet"
SESSION_S = 8 * 3600
CSP = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters["fmt"] = views.fmt
templates.env.filters["ago"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else "-"
_PROCESS_KEY = secrets.token_bytes(32)  # signs sessions when the gateway has no operator token
_known_wallets: set[str] = set()  # wallets the money view listed before (paid ones drop out of "unpaid")


def session_key(gateway: Any) -> bytes:
    token = gateway.operator_token
    if token is None:
        return _PROCESS_KEY
    return hashlib.sha256(b"solanalm-dashboard:" + token.get_secret_value().encode()).digest()


def build_dashboard_router(core: Callable[[Request], Any]) -> APIRouter:
    """The dashboard over `core(request)`, the gateway the API routes use."""
    router = APIRouter(prefix="/dashboard", include_in_schema=False)

    def is_operator(request: Request) -> bool:
        gateway = core(request)
        if gateway.operator_token is None:
            return False
        return views.operator_session_valid(session_key(gateway), request.cookies.get(OPERATOR_COOKIE), time.time())

    async def wallet_of(request: Request, authorization: str | None = None) -> str | None:
        """The signed-in wallet (cookie or bearer key), None when there is none; payments errors as 4xx."""
        key = bearer_key(authorization) or request.cookies.get(WALLET_COOKIE)
        payments = core(request).metering.payments
        if not key or payments is None:
            return None
        try:
            return str((await payments.authenticate(key)).wallet)
        except PaymentError:
            return None

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        gateway = core(request)
        operator = is_operator(request)
        key, wallet_session = session_key(gateway), request.cookies.get(WALLET_COOKIE)
        context |= {
            "operator": operator,
            "operator_enabled": gateway.operator_token is not None,
            "payments_enabled": gateway.metering.payments is not None,
            # One CSRF token per session: the operator's forms carry the first, the wallet's sign-out the second.
            "csrf": views.csrf_token(key, request.cookies.get(OPERATOR_COOKIE)) if operator else "",
            "csrf_wallet": views.csrf_token(key, wallet_session) if wallet_session else "",
            "path": request.url.path,
        }
        response = templates.TemplateResponse(request, name, context, status_code=status)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["Cache-Control"] = "no-store"
        return response

    def check_csrf(request: Request, cookie: str, given: str | None) -> None:
        if not views.csrf_valid(session_key(core(request)), request.cookies.get(cookie), given):
            raise OpenAIError(403, "missing or wrong CSRF token; reload the page", "csrf", "csrf_failed")

    def require_op_session(request: Request, authorization: str | None) -> None:
        if is_operator(request):
            return
        require_operator(core(request).operator_token, authorization)

    @router.get("", response_class=HTMLResponse)
    async def live_page(request: Request) -> HTMLResponse:
        feed = live.feed()
        await feed.tick(core(request))
        return page(request, "live.html", feed=feed, history=json.dumps(list(feed.history)))

    @router.get("/events")
    async def events(request: Request) -> EventSourceResponse:
        gateway = core(request)

        async def stream() -> AsyncIterator[dict[str, str]]:
            feed = live.feed()
            while not await request.is_disconnected():
                await feed.tick(gateway)
                fragment = templates.get_template("_figures.html").render(feed=feed)
                point = json.dumps(feed.history[-1] if feed.history else {})
                yield {"event": "figures", "data": fragment.replace("\n", " ") + _series_script(point)}
                await asyncio.sleep(live.TICK_S)

        return EventSourceResponse(stream(), ping=15, headers={"Cache-Control": "no-store"})

    @router.get("/api/live")
    async def api_live(request: Request) -> dict[str, Any]:
        feed = live.feed()
        await feed.tick(core(request))
        pipelines = [
            {"model": p.model, "replica": p.replica, "queue_depth": p.queue_depth, "running": p.running}
            for p in feed.pipelines
        ]
        return {"object": "dashboard.live", "models": feed.figures, "pipelines": pipelines}

    @router.get("/network", response_class=HTMLResponse)
    async def network_page(request: Request) -> HTMLResponse:
        return page(request, "network.html", net=await reads.network(core(request), is_operator(request)))

    @router.get("/money", response_class=HTMLResponse)
    async def money_page(request: Request) -> HTMLResponse:
        if not is_operator(request):
            return page(request, "money.html", money=None)
        return page(request, "money.html", money=await reads.money(core(request), _known_wallets))

    @router.get("/api/money")
    async def api_money(request: Request, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        require_op_session(request, authorization)
        return {"object": "dashboard.money", **_jsonable(await reads.money(core(request), _known_wallets))}

    @router.get("/training", response_class=HTMLResponse)
    async def training_page(request: Request) -> HTMLResponse:
        from cluster.config.training import TrainingSection

        data = await reads.training(TrainingSection().output_dir)
        return page(request, "training.html", training=data, chart=json.dumps(_loss_series(data["runs"])))

    @router.get("/me", response_class=HTMLResponse)
    async def me_page(request: Request) -> HTMLResponse:
        wallet = await wallet_of(request)
        data = await reads.me(core(request), wallet) if wallet else None
        return page(request, "me.html", me=data)

    @router.get("/api/me")
    async def api_me(request: Request, authorization: str | None = Header(default=None)) -> dict[str, Any]:
        wallet = await wallet_of(request, authorization)
        if wallet is None:
            raise OpenAIError(401, "sign in with your wallet (an API key from /v1/auth/verify)", code="invalid_api_key")
        return {"object": "dashboard.me", **_jsonable(await reads.me(core(request), wallet))}

    @router.post("/signin")
    async def sign_in(request: Request, api_key: str = Form(max_length=200)) -> Response:
        payments = core(request).metering.payments
        if payments is None:
            raise OpenAIError(503, "payments are not enabled on this gateway", code="payments_unavailable")
        try:
            await payments.authenticate(api_key)
        except PaymentError as exc:
            raise OpenAIError(401, exc.message, "api_key", exc.code) from None
        response = RedirectResponse("/dashboard/me", status_code=303)
        _set_cookie(response, WALLET_COOKIE, api_key)
        return response

    @router.post("/signout")
    async def sign_out(request: Request, csrf: str = Form(default="")) -> Response:
        check_csrf(request, WALLET_COOKIE, csrf)
        response = RedirectResponse("/dashboard/me", status_code=303)
        response.delete_cookie(WALLET_COOKIE, path="/dashboard")
        return response

    @router.post("/operator/login")
    async def operator_login(request: Request, token: str = Form(max_length=500)) -> Response:
        gateway = core(request)
        require_operator(gateway.operator_token, f"Bearer {token}")
        response = RedirectResponse("/dashboard/network", status_code=303)
        expires = int(time.time()) + SESSION_S
        _set_cookie(response, OPERATOR_COOKIE, views.operator_session(session_key(gateway), expires))
        return response

    @router.post("/operator/logout")
    async def operator_logout(request: Request, csrf: str = Form(default="")) -> Response:
        check_csrf(request, OPERATOR_COOKIE, csrf)
        response = RedirectResponse("/dashboard", status_code=303)
        response.delete_cookie(OPERATOR_COOKIE, path="/dashboard")
        return response

    @router.post("/actions/settle")
    async def settle(request: Request, csrf: str = Form(default="")) -> Response:
        operator_action(request, csrf)
        payments = core(request).metering.payments
        if payments is None:
            raise OpenAIError(503, "payments are not enabled on this gateway", code="payments_unavailable")
        report = await payments.settle()
        return _done(f"settled: {report.payouts_confirmed} payouts, {report.amount_paid} paid", "/dashboard/money")

    @router.post("/actions/drain")
    async def drain(
        request: Request, node_id: str = Form(max_length=200), csrf: str = Form(default=""), undo: bool = Form(False)
    ) -> Response:
        operator_action(request, csrf)
        from serve_apps.dashboard.actions import set_draining

        record = await set_draining(core(request), node_id, not undo)
        return _done(f"{node_id}: {record.health}", "/dashboard/network")

    @router.post("/actions/replan")
    async def replan(request: Request, model: str = Form(max_length=200), csrf: str = Form(default="")) -> Response:
        operator_action(request, csrf)
        from serve_apps.dashboard.actions import request_replan

        await request_replan(core(request), model)
        return _done(
            f"{model}: re-plan asked; the placement controller takes it on its next round", "/dashboard/network"
        )

    def operator_action(request: Request, csrf: str) -> None:
        if not is_operator(request):
            raise OpenAIError(401, "sign in as the operator first", code="invalid_operator_token")
        check_csrf(request, OPERATOR_COOKIE, csrf)

    @router.get("/static/{name:path}")
    async def static(name: str) -> FileResponse:
        if name not in STATIC:  # only the files shipped in static/: no path from the URL reaches the disk
            raise OpenAIError(404, "no such file", code="not_found")
        return FileResponse(HERE / "static" / name, headers={"Cache-Control": "public, max-age=3600"})

    return router


def _set_cookie(response: Response, name: str, value: str) -> None:
    response.set_cookie(
        name, value, max_age=SESSION_S, httponly=True, samesite="strict", path="/dashboard", secure=False
    )  # secure=False: the embedded default is plain http on localhost; behind TLS the proxy sets Secure


def _done(message: str, back: str) -> Response:
    return RedirectResponse(f"{back}?done={_quote(message)}", status_code=303)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text[:300])


def _series_script(point: str) -> str:
    # Data, not code: a JSON island the page's script reads after each swap (the CSP forbids inline scripts).
    safe = point.replace("</", "<\\/")
    return f'<script type="application/json" id="series-point">{safe}</script>'


def _loss_series(runs: list[dict[str, Any]]) -> dict[str, Any]:
    series: dict[str, Any] = {}
    for run in runs:
        if run["kind"] == "federated":
            series[run["name"]] = [[r["round"], r["train_loss"]] for r in run["rounds"] if r["train_loss"] is not None]
        else:
            series[run["name"]] = [list(point) for point in run["steps"]]
    return series


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o)))
