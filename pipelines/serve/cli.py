"""`ssjdn serve --store URL [--host 127.0.0.1] [--port 8000]` (= `python -m pipelines.serve`): the HTTP search
service and its page over one store version. The flags are `ServeOptions`' fields."""

from __future__ import annotations

import argparse

NAME = "serve"
HELP = "serve text and image search over an embedding store: a JSON API and a web page (FastAPI + uvicorn)"


def configure(p: argparse.ArgumentParser) -> None:
    from pipelines.options import add_arguments
    from pipelines.serve.options import ServeOptions

    p.add_argument("--store", required=True, metavar="URL", help="embedding store root (opened read-only)")
    add_arguments(p, ServeOptions)


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep, never spin
    from pipelines.options import from_args
    from pipelines.serve.options import ServeOptions
    from pipelines.serve.server import serve

    serve(args.store, from_args(ServeOptions, args))
    return 0
