"""One module per `ssjdn` subcommand.

Each module defines `NAME`, `HELP`, `configure(parser)` and `run(args) -> int`. Top-level imports stay light
(argparse only) so `ssjdn --help` is fast; heavy imports (torch, ray, prefect) happen inside `run`.
"""
