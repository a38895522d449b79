"""``catena-sandbox``: run the sandbox as a process and print its base URL first on stdout.

Tests that treat the target as a black box start this in a subprocess, read the first stdout line
to learn the URL, and drive the sandbox over ``/_sandbox/``. Logs go to stderr; SIGTERM and SIGINT
stop it cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from target_catena_messages.sandbox.config import SandboxConfigError, load_config
from target_catena_messages.sandbox.server import Sandbox

log = logging.getLogger("target_catena_messages.sandbox")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catena-sandbox",
        description="A local Catena-compatible API server with a fault plan.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0 picks a free one)")
    parser.add_argument("--config", metavar="FILE", help="JSON config: fault plan, users, ...")
    parser.add_argument("--log-level", default="INFO", help="stderr log level (default INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop, 2 for a bad config, 1 when it cannot bind."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config)
    except SandboxConfigError as exc:
        log.error("%s", exc)  # noqa: TRY400 - one clear line, no traceback
        return 2
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sandbox = Sandbox(config, host=args.host, port=args.port)
    try:
        url = sandbox.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)  # noqa: TRY400
        return 1
    sys.stdout.write(url + "\n")
    sys.stdout.flush()
    while not stop.wait(0.2):
        pass
    sandbox.stop()
    log.info("catena sandbox stopped")
    return 0
