"""`grape serve`: a local web page and JSON API over one index, with the models loaded once.

A cold `grape search` spends seconds importing torch and loading the models for a query
that takes milliseconds; a server pays that once. It is a Starlette app on uvicorn:

    GET  /                     the page (grape_cli/static/index.html, self-contained)
    GET  /api/health           index path, model, number of images, rewriters
    GET  /api/rewriters        the rewriters a query can pick ("none" first)
    GET  /api/search           ?q=&k=&rewriter=&image_id=&image_weight=
    GET  /api/image/{id}       a JPEG thumbnail (?size=, default 256) or the file (?full=1)
    POST /api/pairs            {"query", "target_id", "image_id"?}: "this is the one"

Images are named by their row id (the index's `id` column), never by a path from the
client, and only files whose real path lies under the index's roots are served. Every
error is a JSON object `{"error", "hint"}`: a `GrapeError` is a 4xx with its message and
hint, anything unexpected a 500 that says nothing about the internals.

The server binds to loopback by default and then answers only requests addressed to
localhost (a DNS-rebinding guard). On any other address it requires a token: in an
`Authorization: Bearer` header, an `X-Grape-Token` header, a `?token=` parameter (the
page's URL; the page then keeps it in an HttpOnly cookie), or that cookie.

While it runs, the server writes `serve.json` into the index folder (see
`grape_cli.remote`) so that `grape search` on the same index can use it.
"""

from __future__ import annotations

import copy
import errno
import functools
import io
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import socket
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from grape_cli import __version__
from grape_cli.errors import GrapeError, IndexNotFound, InputError, UsageError
from grape_cli.feedback import append_pair, count_pairs, pairs_file
from grape_cli.remote import MAX_K, ServerInfo, find_server, remove_state, write_state

logger = logging.getLogger("grape")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
THUMB_PX = 256
MAX_QUERY_CHARS = 4000
MAX_BODY_BYTES = 64 * 1024
MAX_ID_CHARS = 128  # row ids are grape_cli.store.path_id's 24 hex digits
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class ApiError(GrapeError):
    """An error with its HTTP status."""

    def __init__(self, status: int, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.status = status


def not_found(what: str = "image") -> ApiError:
    return ApiError(404, f"no such {what} in this index", "use the ids /api/search returns")


def http_status(e: GrapeError) -> int:
    if isinstance(e, ApiError):
        return e.status
    if isinstance(e, IndexNotFound):
        return 404
    return 400


# --------------------------------------------------------------------------- settings


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface.

    >>> [is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "10.0.0.2")]
    [True, True, True, False, False]
    """
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> tuple[str | None, bool]:
    """(token to require, whether it was generated here). Off loopback a token is required:
    one is generated with `secrets` when none is given."""
    if token is not None:
        token = token.strip()
        if len(token) < 16:
            raise UsageError(
                "--token is too short (fewer than 16 characters)",
                "use a longer one, or leave out --token to have one generated",
            )
        return token, False
    if is_loopback(host):
        return None, False
    return secrets.token_urlsafe(24), True


def check_no_server(index_dir: str | Path | None) -> None:
    """Refuse to start a second server on the same index (checked before loading models)."""
    from grape_cli.store import Store, default_index_dir

    root = Path(index_dir or default_index_dir()).expanduser().resolve()
    Store.read_manifest(root)  # no index: say so before anything else
    running = find_server(root)
    if running is not None:
        raise UsageError(
            f"a grape server is already running for {root} at {running.url} (pid {running.pid})",
            "use that one, or stop it first",
        )


# --------------------------------------------------------------------------- service


@dataclass(frozen=True)
class RewriterEntry:
    name: str  # what /api/search?rewriter= takes
    label: str  # what the page shows
    path: str | None = None  # the folder, resolved, for a local rewriter


class _Warnings(logging.Handler):
    """Collects the "grape" warnings one thread logs while it searches."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


class Service:
    """The models, vectors and rows of one index, loaded once; what the routes call.

    One `Searcher` holds the index; each extra rewriter is a shallow copy of it that
    shares the vectors and the CLIP model and differs only in its rewriter.
    """

    def __init__(
        self,
        index_dir: str | Path | None = None,
        rewriters: list[str] | tuple[str, ...] = (),
        *,
        device: str | None = None,
        threads: int | None = None,
        trust_remote_code: bool = False,
    ):
        from grape_cli.rewrite import ALIASES, load_rewriter
        from grape_cli.search import Searcher, cpu_threads

        base = Searcher(index_dir, rewriter="none", device=device, threads=threads)
        self.store = base.store
        self.root = base.store.root
        self.searchers = {"none": base}
        self.rewriters = [RewriterEntry("none", "none")]
        default = None
        if not rewriters:  # the index's own rewriters (`grape rewriters`), its default chosen
            from grape_cli.rewriters import default_spec, list_rewriters

            rewriters = [e.path for e in list_rewriters(self.root)]
            default = default_spec(self.root)
        for spec in rewriters:
            spec = ALIASES.get(spec, spec)
            if spec.strip().lower() in ("", "none") or spec in self.searchers:
                continue
            with cpu_threads(threads):
                rewriter = load_rewriter(
                    spec,
                    device=base.device,
                    trust_remote_code=trust_remote_code,
                    retriever=base.store.model,
                )
            view = copy.copy(base)
            view.rewriter = rewriter
            self.searchers[rewriter.name] = view
            folder = Path(spec).expanduser()
            path = str(folder.resolve()) if folder.is_dir() else None
            label = folder.name if path else spec
            self.rewriters.append(RewriterEntry(rewriter.name, label, path))
        self.default_rewriter = next(
            (r.name for r in self.rewriters if default and r.path == str(Path(default).resolve())),
            self.rewriters[-1].name if not default and len(rewriters) else "none",
        )
        self._lock = threading.Lock()  # one search at a time: the models are not re-entrant
        self._real_roots = [os.path.realpath(r) for r in base.store.manifest.get("roots", []) if r]
        rows = base.store.read_columns(("id", "path"))
        self._path_of = dict(zip(rows["id"], rows["path"], strict=True))
        self._id_of = {p: i for i, p in self._path_of.items()}
        self.size = base.size
        self.index_updated = base.store.manifest.get("updated")

    # ------------------------------------------------------------------ facts

    def index_changed(self) -> bool:
        """Whether `grape index` has written to the index since it was loaded here."""
        from grape_cli.store import Store

        try:
            return Store.read_manifest(self.root).get("updated") != self.index_updated
        except (GrapeError, OSError, ValueError):
            return True

    def health(self) -> dict:
        return {
            "status": "ok",
            "version": __version__,
            "index": str(self.root),
            "model": self.store.model,
            "images": self.size,
            "backend": self.searchers["none"].backend,
            "device": self.searchers["none"].device,
            "rewriters": [r.name for r in self.rewriters],
            "pairs_file": str(pairs_file(self.root)),
            "pairs": count_pairs(self.root),
            "index_changed": self.index_changed(),
            "load_timings": {k: round(v, 4) for k, v in self.searchers["none"].timings.items()},
        }

    def rewriter_list(self) -> dict:
        return {
            "rewriters": [asdict(r) for r in self.rewriters],
            "default": self.default_rewriter,
        }

    # ------------------------------------------------------------------ rows

    def row_path(self, row_id) -> str:
        """The indexed path of a row id; 404 for anything that is not one."""
        if not isinstance(row_id, str) or len(row_id) > MAX_ID_CHARS:
            raise not_found()
        path = self._path_of.get(row_id)  # exact: no normalising, no path ever used
        if path is None:
            raise not_found()
        return path

    def image_file(self, row_id) -> str:
        """The real path of a row's file, if it may be read: a regular file under one of the
        index's roots once every symlink is resolved. 404 otherwise, whatever the reason."""
        real = os.path.realpath(self.row_path(row_id))
        inside = any(
            real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self._real_roots
        )
        if not inside or not os.path.isfile(real):
            raise not_found()
        return real

    def thumbnail(self, row_id, size: int = THUMB_PX) -> bytes:
        real = self.image_file(row_id)
        try:
            return _thumbnail(real, os.stat(real).st_mtime_ns, size)
        except OSError:
            raise not_found() from None
        except Exception as e:
            from grape_cli.embed import describe_error

            raise ApiError(422, f"cannot show this image: {describe_error(e)}") from None

    # ------------------------------------------------------------------ actions

    def search(
        self,
        q: str | None,
        k: int = 10,
        *,
        rewriter: str | None = None,
        image_id: str | None = None,
        image_weight: float = 1.0,
    ) -> dict:
        q = (q or "").strip()
        if len(q) > MAX_QUERY_CHARS:
            raise InputError(
                f"the query is {len(q)} characters long", f"keep it under {MAX_QUERY_CHARS}"
            )
        if not 1 <= k <= MAX_K:
            raise UsageError(f"k={k}: need 1 to {MAX_K} results", f"use k between 1 and {MAX_K}")
        if not math.isfinite(image_weight):
            raise UsageError("image_weight must be a finite number")
        name = rewriter or self.default_rewriter
        if name not in self.searchers:
            raise UsageError(
                f"unknown rewriter {name!r}",
                f"this server has {', '.join(self.searchers)}; start it with --rewriter to add one",
            )
        image = self.image_file(image_id) if image_id else None
        searcher = self.searchers[name if q else "none"]  # an image alone needs no rewriter
        with self._lock:
            capture = _Warnings()
            logger.addHandler(capture)
            try:
                result = searcher.search(q, k, image=image, image_weight=image_weight)
            finally:
                logger.removeHandler(capture)
        data = result.to_dict()
        # This query's own stages; loading was paid once, at start-up (see /api/health).
        data["timings"] = {
            stage: sec for stage, sec in data["timings"].items() if stage not in searcher.timings
        }
        for hit in data["hits"]:
            hit["id"] = self._id_of.get(hit["path"])
        data["image_id"] = image_id or None
        data["warnings"] = capture.messages
        return data

    def add_pair(self, query, target_id, image_id=None) -> dict:
        target = self.row_path(target_id)
        image = self.row_path(image_id) if image_id else None
        count = append_pair(self.root, query, target, image)
        return {"pairs": count, "path": str(pairs_file(self.root))}


@functools.lru_cache(maxsize=2048)
def _thumbnail(path: str, mtime_ns: int, size: int) -> bytes:
    """A JPEG of the image, longest side `size`; cached per file version."""
    from grape_cli.embed import decode_image

    img, _ = decode_image(path, draft_size=size)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


# --------------------------------------------------------------------------- app


def page_html() -> bytes:
    from importlib.resources import files

    return files("grape_cli").joinpath("static", "index.html").read_bytes()


PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def create_app(service: Service, *, token: str | None = None, loopback: bool = True, port=None):
    """The ASGI app: Starlette routes behind the host/token guard."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import FileResponse, Response
    from starlette.routing import Route

    page = page_html()

    def json_response(data, status: int = 200) -> Response:
        body = json.dumps(data, ensure_ascii=False).encode("utf-8")
        return Response(
            body,
            status,
            media_type="application/json; charset=utf-8",
            headers={"Cache-Control": "no-store"},
        )

    def index(request):
        return Response(
            page,
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"},
        )

    def health(request):
        return json_response(service.health())

    def rewriters(request):
        return json_response(service.rewriter_list())

    def search(request):
        p = request.query_params
        return json_response(
            service.search(
                p.get("q", ""),
                _int(p, "k", 10),
                rewriter=p.get("rewriter") or None,
                image_id=p.get("image_id") or None,
                image_weight=_float(p, "image_weight", 1.0),
            )
        )

    def image(request):
        row_id = request.path_params["id"]
        real = service.image_file(row_id)  # an unknown id is a 404, whatever else is asked
        p = request.query_params
        if p.get("full", "") not in ("", "0", "false"):
            return FileResponse(real, headers={"Cache-Control": "private, max-age=3600"})
        size = _int(p, "size", THUMB_PX)
        if not 16 <= size <= 1024:
            raise UsageError(f"size={size}: thumbnails are 16 to 1024 pixels")
        return Response(
            service.thumbnail(row_id, size),
            media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    async def pairs(request):
        from starlette.concurrency import run_in_threadpool

        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "send the pair as JSON", "Content-Type: application/json")
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise ApiError(413, "the request is too large")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, "the request is too large")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise InputError("the body is not valid JSON", PAIR_HINT) from None
        if not isinstance(data, dict):
            raise InputError("the body must be a JSON object", PAIR_HINT)
        out = await run_in_threadpool(
            service.add_pair, data.get("query"), data.get("target_id"), data.get("image_id")
        )
        return json_response(out)

    async def grape_error(request, exc: GrapeError):
        return json_response({"error": exc.message, "hint": exc.hint}, http_status(exc))

    async def http_error(request, exc: HTTPException):
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, exc.detail)
        return json_response({"error": message, "hint": None}, exc.status_code)

    async def internal_error(request, exc: Exception):
        logger.error("grape serve: %s on %s", type(exc).__name__, request.url.path)
        return json_response(
            {"error": "internal server error", "hint": "see the server's log"}, 500
        )

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/api/health", health, methods=["GET"]),
            Route("/api/rewriters", rewriters, methods=["GET"]),
            Route("/api/search", search, methods=["GET"]),
            Route("/api/image/{id}", image, methods=["GET"]),
            Route("/api/pairs", pairs, methods=["POST"]),
        ],
        exception_handlers={
            GrapeError: grape_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
    )
    return Guard(app, token=token, loopback=loopback, port=port)


PAIR_HINT = 'send {"query": "...", "target_id": "<id from /api/search>"}'


def _int(params, name: str, default: int) -> int:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a whole number") from None


def _float(params, name: str, default: float) -> float:
    raw = params.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not a number") from None


class Guard:
    """ASGI middleware: the localhost-only and token checks, the cross-site checks, and
    the security headers on every response."""

    HEADERS = (
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
    )

    def __init__(self, app, *, token: str | None, loopback: bool, port=None):
        self.app = app
        self.token = token
        self.loopback = loopback
        self.cookie = f"grape_token_{port or 'x'}"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.loopback and not is_loopback(_hostname(host)):
            return await _deny(
                send, 403, "this server answers only to localhost", "open http://127.0.0.1:PORT/"
            )
        set_cookie = None
        if self.token is not None:
            how = self._authorized(scope, headers)
            if how is None:
                return await _deny(
                    send,
                    401,
                    "missing or wrong token",
                    "open the URL grape serve printed (with ?token=...), "
                    "or send Authorization: Bearer TOKEN",
                )
            if how == "query" and scope["path"] == "/":
                set_cookie = (
                    f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                ).encode()
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD") and origin and _netloc(origin) != host.lower():
            return await _deny(send, 403, "cross-site requests are refused")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = list(self.HEADERS)
                if set_cookie:
                    extra.append((b"set-cookie", set_cookie))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _authorized(self, scope, headers) -> str | None:
        from http.cookies import SimpleCookie
        from urllib.parse import parse_qs

        candidates = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            candidates.append(("header", auth[7:].strip()))
        if "x-grape-token" in headers:
            candidates.append(("header", headers["x-grape-token"].strip()))
        if "cookie" in headers:
            cookie = SimpleCookie()
            try:
                cookie.load(headers["cookie"])
            except Exception:  # a malformed cookie header: as if there were none
                cookie = SimpleCookie()
            if self.cookie in cookie:
                candidates.append(("cookie", cookie[self.cookie].value))
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        candidates += [("query", t) for t in query.get("token", [])]
        expected = self.token.encode()
        for how, given in candidates:
            if secrets.compare_digest(given.encode("utf-8", "replace"), expected):
                return how
        return None


def _hostname(host_header: str) -> str:
    """'127.0.0.1:8765' -> '127.0.0.1', '[::1]:80' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _netloc(origin: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(origin.strip().lower()).netloc


async def _deny(send, status: int, message: str, hint: str | None = None) -> None:
    body = json.dumps({"error": message, "hint": hint}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *Guard.HEADERS,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- server


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); a GrapeError if it cannot."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError):
        raise UsageError(
            f"cannot listen on {host!r}: not an address of this machine",
            "use 127.0.0.1 (the default), or an address of this machine",
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} on {host} is already in use",
                "pick another with --port (--port 0: any free port)",
            ) from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


class _Stop(Exception):
    """SIGTERM, turned into an exception so that the state file is removed."""


def _raise_stop(signum, frame):
    raise _Stop


class GrapeServer:
    """uvicorn serving `create_app(service)` on host:port; `serve_forever()` blocks (Ctrl-C
    or SIGTERM end it), `start()` runs it in a thread (tests, benchmarks) until `stop()`."""

    def __init__(
        self,
        service: Service,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
        log_level: str = "warning",
        sock: socket.socket | None = None,
        advertise: bool = True,
    ):
        import uvicorn

        self.service = service
        self.host = host
        self.token = token
        self._sock = sock or bind(host, port)  # bound early by the CLI: fail before loading
        self.port = self._sock.getsockname()[1]
        app = create_app(service, token=token, loopback=is_loopback(host), port=self.port)
        config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,  # the page's first URL carries the token
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=3,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.advertise = advertise  # write serve.json, for `grape search`
        self.info = ServerInfo(
            pid=os.getpid(),
            host=host,
            port=self.port,
            index=str(service.root),
            token=token,
            rewriters=[asdict(r) for r in service.rewriters],
        )

    @property
    def url(self) -> str:
        return self.info.url

    def serve_forever(self) -> None:
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_stop) if in_main else None
        try:
            if self.advertise:
                write_state(self.info)
        except OSError as e:
            logger.warning(
                "cannot write serve.json into the index folder (%s): `grape search` will "
                "not use this server",
                e.strerror,
            )
        try:
            self._server.run(sockets=[self._sock])
        except (KeyboardInterrupt, _Stop):
            pass  # uvicorn has shut down gracefully and re-raised the signal
        finally:
            if self.advertise:
                remove_state(self.info)
            self._sock.close()
            if in_main:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def start(self, timeout: float = 30.0) -> GrapeServer:
        self._thread = threading.Thread(target=self.serve_forever, name="grape-serve", daemon=True)
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.01)):
            if self._server.started or not self._thread.is_alive():
                break
            deadline.wait(0.01)
        if not self._server.started:
            raise RuntimeError("grape serve did not start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
