"""The warm path of `grape search`: ask a running `grape serve` of the same index.

`grape serve` writes a small file into the index folder while it runs (`serve.json`:
pid, host, port, token, the rewriters it has loaded), removed when it stops. `grape
search` reads it, checks that the server is alive and answers within `HEALTH_TIMEOUT_S`,
and if the options are ones the server supports, gets its results from there instead of
loading torch, the models and the vectors itself. Any doubt (no file, a dead pid, no
answer, another index, an error) falls back to a local search, silently: the output is
the same either way.

Standard library only, so that the warm path stays warm (no torch import).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from grape_cli.search import SearchResult

logger = logging.getLogger("grape")

STATE_FILE = "serve.json"
HEALTH_TIMEOUT_S = 0.2  # a server that does not answer /api/health this fast is ignored
SEARCH_TIMEOUT_S = 60.0
MAX_K = 1000  # the server's limit on -k
NO_SERVER_ENV = "GRAPE_NO_SERVER"  # set to 1 to never use a running server


def state_file(index_dir: str | Path) -> Path:
    return Path(index_dir) / STATE_FILE


@dataclass
class ServerInfo:
    """What a running server says about itself in the index folder."""

    pid: int
    host: str  # the address it is bound to
    port: int
    index: str
    hostname: str = field(default_factory=socket.gethostname)
    token: str | None = None
    rewriters: list[dict] = field(default_factory=list)  # [{"name", "label", "path"}]
    started: float = field(default_factory=time.time)

    @property
    def url(self) -> str:
        """Where a client on this machine reaches it."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"


def write_state(info: ServerInfo) -> Path:
    """Written atomically, readable by the owner only (it may hold the token)."""
    path = state_file(info.index)
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(info.__dict__, f, ensure_ascii=False, indent=2)
    os.replace(tmp, path)
    return path


def remove_state(info: ServerInfo) -> None:
    """Remove the index's state file if it is still this server's."""
    current = read_state(info.index)
    if current is not None and (current.pid, current.port) == (info.pid, info.port):
        state_file(info.index).unlink(missing_ok=True)


def read_state(index_dir: str | Path) -> ServerInfo | None:
    try:
        data = json.loads(state_file(index_dir).read_text(encoding="utf-8"))
        return ServerInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OSError, OverflowError):
        return False
    return True


# No proxy: the server is on this machine, and an http_proxy setting must not see the token.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(info: ServerInfo, path: str, timeout: float) -> dict:
    req = urllib.request.Request(info.url + path, headers={"Accept": "application/json"})
    if info.token:
        req.add_header("Authorization", f"Bearer {info.token}")
    with _OPENER.open(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


def find_server(index_dir: str | Path, timeout: float = HEALTH_TIMEOUT_S) -> ServerInfo | None:
    """The live server of this index, or None: no state file, a dead pid, no answer within
    `timeout`, or a server of another index."""
    found = _live_server(index_dir, timeout)
    return found[0] if found else None


def _live_server(index_dir: str | Path, timeout: float) -> tuple[ServerInfo, dict] | None:
    """(state, /api/health answer) of the live server of this index, or None."""
    root = Path(index_dir).expanduser().resolve()
    info = read_state(root)
    if info is None:
        return None
    if info.hostname == socket.gethostname() and not _pid_alive(info.pid):
        return None  # a stale file left by a killed server
    try:
        health = _request(info, "/api/health", timeout)
    except (OSError, ValueError):  # refused, timed out, HTTP error, not JSON
        return None
    if not isinstance(health, dict) or health.get("index") != str(root):
        return None
    return info, health


def _server_rewriter(info: ServerInfo, spec: str | None) -> str | None:
    """The server's name for the rewriter `spec` names, or None if it has not loaded it."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return "none"
    from grape_cli.rewrite import ALIASES

    spec = ALIASES.get(spec, spec)
    folder = Path(spec).expanduser()
    real = str(folder.resolve()) if folder.is_dir() else None
    for entry in info.rewriters:
        if (real and entry.get("path") == real) or (not real and entry.get("name") == spec):
            return entry["name"]
    return None


def search_via_server(
    query: str | None,
    index_dir: str | Path | None,
    k: int = 10,
    *,
    rewriter: str | None = None,  # None: the index's default rewriter
    image: str | Path | None = None,
    image_weight: float = 1.0,
    **others,
) -> SearchResult | None:
    """The result a running server of this index gives, exactly as a local
    `grape_cli.search.search` would return it; None when there is no such server or the
    query needs something the server does not do (`others` are the remaining options of
    `search`, which the server supports only at their defaults)."""
    if os.environ.get(NO_SERVER_ENV, "").strip() not in ("", "0"):
        return None
    defaults = {"rewrites": 1, "backend": "auto", "trust_remote_code": False, "exact": False}
    for name, value in others.items():
        if value is not None and not (name in defaults and value == defaults[name]):
            return None  # sampling, a prompt file, a backend, a device, threads, a seed...
    query = (query or "").strip()
    if not (query or image) or not 1 <= k <= MAX_K:
        return None  # a local search gives the error message
    from grape_cli.store import default_index_dir, path_id

    root = Path(index_dir or default_index_dir()).expanduser().resolve()
    found = _live_server(root, HEALTH_TIMEOUT_S)
    if found is None or found[1].get("index_changed") is not False:
        return None  # none, or its vectors predate a later `grape index`: search here
    info = found[0]
    is_default = False
    if rewriter is None:  # the index's default rewriter, as a local search would use
        from grape_cli.rewriters import default_spec

        rewriter = default_spec(root) or "none"
        is_default = rewriter != "none"
    name = _server_rewriter(info, rewriter if query else None)
    if name is None:
        return None
    params: dict[str, str] = {"q": query, "k": str(k), "rewriter": name}
    if image is not None:
        if not os.path.isfile(image):
            return None
        # Only an image that is a row of the index, named by its id: the server never
        # reads a path a client gives it.
        params["image_id"] = path_id(os.path.abspath(os.path.expanduser(str(image))))
        params["image_weight"] = repr(float(image_weight))
    start = time.perf_counter()
    try:
        data = _request(info, "/api/search?" + urllib.parse.urlencode(params), SEARCH_TIMEOUT_S)
        result = result_from_dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    result.timings["server_request"] = time.perf_counter() - start
    # As a local search names them: the rewriter as given, the image as typed.
    if query and name != "none":
        from grape_cli.rewrite import ALIASES

        result.rewriter = ALIASES.get(rewriter, rewriter)
        result.rewriter_default = is_default
    if image is not None:
        result.image = str(image)
    for message in data.get("warnings", []):
        logger.warning("%s", message)
    return result


def result_from_dict(data: dict) -> SearchResult:
    """A `SearchResult` from the server's JSON (extra keys, such as row ids, dropped)."""
    from dataclasses import fields

    from grape_cli.search import Hit, SearchResult

    hit_fields = {f.name for f in fields(Hit)}
    result_fields = {f.name for f in fields(SearchResult)}
    kwargs = {k: v for k, v in data.items() if k in result_fields}
    kwargs["hits"] = [Hit(**{k: v for k, v in h.items() if k in hit_fields}) for h in data["hits"]]
    kwargs["timings"] = dict(data.get("timings") or {})
    return SearchResult(**kwargs)
