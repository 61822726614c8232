"""Run the service: token and bind checks, the read-only `Searcher` (watching for new generations), uvicorn with
graceful shutdown (SIGTERM/SIGINT: stop accepting, finish open requests within `GRACE_S`, answer queued queries,
then exit)."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from pipelines.serve.options import ServeOptions, ServeOptionsError

log = logging.getLogger("ssjdn.serve")

GRACE_S = 10


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(path: str | None) -> str | None:
    """The token in `path` (surrounding whitespace dropped); ServeOptionsError when unreadable or empty."""
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeOptionsError(f"--token-file {path}: cannot read it ({type(exc).__name__})") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ServeOptionsError(f"--token-file {path}: the token must be one word of at least 16 characters")
    mode = os.stat(path).st_mode
    if mode & 0o004:
        log.warning("--token-file %s is readable by every user (mode %o); chmod 600 it", path, mode & 0o777)
    return token


def check_bind(options: ServeOptions, token: str | None) -> None:
    if not is_loopback(options.host) and token is None:
        raise ServeOptionsError(
            f"--host {options.host} is reachable from other machines: give --token-file FILE (an API token "
            "every request must send as `Authorization: Bearer TOKEN`), or keep the default 127.0.0.1"
        )


def serve(store_url: str, options: ServeOptions) -> None:
    import uvicorn

    from pipelines.search.searcher import Searcher
    from pipelines.serve.app import create_app
    from pipelines.serve.media import public_url

    token = read_token(options.token_file)
    check_bind(options, token)  # before anything slow: a refused bind costs nothing
    searcher = Searcher(
        store_url,
        model_id=options.model_id,
        checkpoint=options.checkpoint,
        storage_options=options.storage_options,
        ann=options.ann,
        wait_ann=False,
        read_only=True,
        cache_dir=options.cache_dir,
        refresh_s=options.refresh_s,
        max_image_pixels=options.max_image_pixels,
        ann_expansion_search=options.ann_expansion,
    )
    try:
        searcher.watch()
        status = searcher.status()
        rows = ", ".join(f"{n} {t['rows']} rows ({t['exact']})" for n, t in status["tables"].items())
        log.info(
            "serving %s version %s generation %d: %s; %s",
            public_url(store_url),
            status["model_id"][:12],
            status["generation"],
            rows or "no rows",
            "an API token is required (Authorization: Bearer ...)"
            if token
            else "no token: open to anyone who can reach the address",
        )
        app = create_app(searcher, options, token=token)
        config = uvicorn.Config(
            app,
            host=options.host,
            port=options.port,
            log_config=None,  # our logging setup (pipelines.command); uvicorn's own lines propagate to it
            access_log=False,  # our structured access log replaces uvicorn's
            server_header=False,
            timeout_graceful_shutdown=GRACE_S,
        )
        uvicorn.Server(config).run()
    finally:
        searcher.close()
