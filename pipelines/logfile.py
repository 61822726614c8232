"""Ray's and transformers' messages go to a log file, not the console: a user sees the pipeline's own lines.

`route_library_logs(command)` (called by `command.run_command`) sends the loggers of `LIBRARY_LOGGERS` (and every
child of them that exists now) to one file, `log_dir()/ssjdn-<command>-<time>-<pid>.log`,
with propagation off, and Python warnings with them. The file is created, and its path printed once on stderr, on
the first message. The libraries add console handlers of their own when they are imported (Ray, Ray Data) or
first used (transformers): `reroute()` takes those off again; the jobs call it just before `ray.init`.
`quiet_ray_env` (before a `ray.init` that starts a local Ray) quiets the Ray processes' own output;
`TRANSFORMERS_VERBOSITY=error` keeps transformers' load reports off the Ray workers' output. Set
`SSJDN_LIBRARY_LOGS_ON_CONSOLE=1` to keep everything on the console. The pipeline's own loggers (`pipelines.*`, `ssjdn.*`, `flows.*`, Prefect's) are untouched.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

LIBRARY_LOGGERS = ("ray", "transformers", "urllib3", "filelock", "py.warnings", "huggingface_hub")
# Inherited by the Ray processes started from here: transformers' load reports stay off the workers' output.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error"}
# For a Ray started here: its workers' `ray` loggers at ERROR (Ray Train's controller and PlacementGroupCleaner
# warn every few seconds on a loaded machine; with log_to_driver those lines reach the console). The driver's
# own `ray` logger keeps its level (read when ray was imported) and goes to the file.
RAY_WORKER_ENV = {"RAY_LOGGER_LEVEL": "error"}
# Only where no Ray process's output is forwarded (log_to_driver=False): every C++ process then prints a
# `logging.cc ... Set ray log level` line, but the driver's core worker no longer prints `core_worker.cc` errors.
RAY_QUIET_DRIVER_ENV = {"RAY_BACKEND_LOG_LEVEL": "fatal"}


def quiet_ray_env(log_to_driver: bool) -> None:
    """Before a `ray.init` that starts a local Ray: the settings above (an explicit user value wins)."""
    for key, value in {**RAY_WORKER_ENV, **({} if log_to_driver else RAY_QUIET_DRIVER_ENV)}.items():
        os.environ.setdefault(key, value)


_handler: _LibraryFileHandler | None = None


class _LibraryFileHandler(logging.FileHandler):
    """A file handler that says where it writes, once, when it writes first."""

    def __init__(self, path: Path, label: str) -> None:
        super().__init__(path, delay=True, encoding="utf-8")
        self.label = label
        self.announced = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.announced:
            self.announced = True
            print(
                f"{self.label}: Ray and library messages go to {self.baseFilename}",
                file=sys.stderr,
                flush=True,
            )
        super().emit(record)


def log_dir() -> Path:
    """`$SSJDN_LOG_DIR`, else `$SSJDN_CACHE_DIR/logs`, else `~/.cache/ssjdn/logs`."""
    if os.environ.get("SSJDN_LOG_DIR"):
        return Path(os.environ["SSJDN_LOG_DIR"])
    return Path(os.environ.get("SSJDN_CACHE_DIR") or Path.home() / ".cache" / "ssjdn") / "logs"


def route_library_logs(command: str, directory: str | os.PathLike | None = None) -> Path:
    """Send the libraries' loggers to a file (made on the first message); returns its path."""
    global _handler
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    folder = Path(directory) if directory is not None else log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = command.replace(" ", "-").replace("/", "-")
    path = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    if _handler is not None:
        _handler.close()
    _handler = _LibraryFileHandler(path, command)
    _handler.setLevel(logging.INFO)  # Ray Data's loggers are at DEBUG: megabytes of scheduler state
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    reroute()
    return path


def _is_console(handler: logging.Handler) -> bool:
    return (
        isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
        and getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    )


def reroute() -> None:
    """Take the console handlers off the libraries' loggers (and their children) and log them to the file."""
    if _handler is None:
        return
    if "transformers" in sys.modules:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_default_handler()
        except Exception:  # noqa: BLE001 - an old or broken transformers: its lines stay where they were
            pass
    names = set(LIBRARY_LOGGERS) | {
        n
        for n in logging.root.manager.loggerDict
        if n.split(".")[0] in {p.split(".")[0] for p in LIBRARY_LOGGERS}
    }
    for name in sorted(names):
        if name.startswith("py.") and name != "py.warnings":
            continue
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if _is_console(h):
                logger.removeHandler(h)
        if name in LIBRARY_LOGGERS and _handler not in logger.handlers:
            logger.addHandler(_handler)
        if name in LIBRARY_LOGGERS:
            logger.propagate = False
        elif not logger.propagate and _handler not in logger.handlers:  # a child with its own (ray.data)
            logger.addHandler(_handler)
            logger.propagate = False
