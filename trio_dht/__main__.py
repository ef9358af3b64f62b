"""``trio-dht`` and ``python -m trio_dht``: run a node, and by default its REST proxy, until SIGINT/SIGTERM.

``trio-dht client ...`` is the device-side proxy client instead (:mod:`trio_dht.client.cli`);
``trio-dht vapid-keygen PATH`` writes a new VAPID key (:mod:`trio_dht.push.vapid`).

Exit codes: 0 after SIGINT/SIGTERM (or ``--help``/``--version``), 1 when a task failed (one line on stderr
says why; ``-v`` adds the traceback), 2 for bad flags or a log file (``-l``) that cannot be opened.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Sequence

import trio

from trio_dht import logs
from trio_dht.app import run
from trio_dht.cli import describe_failure, leaf_exceptions, parse_args

log = logging.getLogger("trio_dht")


def tune_garbage_collector() -> None:
    """A server's settings (the process's, not a library's to make).

    What start-up allocated is moved out of the collector's sight, and a full collection, which walks every
    object the process holds (every subscription among them), waits for a thousand middle-generation ones
    (CPython's default: ten) as well as CPython's own rule (the old generation grown by a quarter). Young
    collections stay small and frequent (1,500 allocations; CPython's 700): an object is then traversed while
    still in the CPU's cache, and no pause is long, where a large young generation makes each young
    collection walk hundreds of thousands of objects.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(1_500, 10, 1_000)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program with ``argv`` (default ``sys.argv[1:]``) and return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["client"]:
        from trio_dht.client.cli import client_main  # the device-side proxy client, with its own flags

        return client_main(argv[1:])
    if argv[:1] == ["vapid-keygen"]:
        from trio_dht.push.vapid import keygen_main  # needs the cryptography package

        return keygen_main(argv[1:])
    config = parse_args(argv)
    try:
        handler = logs.open_log_file(config.log_file) if config.log_file is not None else None
    except OSError as exc:
        print(
            f"trio-dht: error: cannot open the log file {config.log_file}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    configure_logging(config.verbose, handler, config.log_format)
    tune_garbage_collector()
    try:
        trio.run(run, config)
    except BaseException as exc:
        leaves = leaf_exceptions(exc)
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return 0  # Ctrl-C outside the signal receiver's lifetime (e.g. while importing)
        if not all(isinstance(leaf, Exception | KeyboardInterrupt) for leaf in leaves):
            raise  # SystemExit and the like keep their meaning
        if config.verbose:
            log.error("traceback of the failure", exc_info=exc)
        if config.log_file is not None:  # the file says why the program stopped, too
            log.error("stopped by a failure: %s", describe_failure(exc))
        print(f"trio-dht: error: {describe_failure(exc)}", file=sys.stderr)
        return 1
    return 0


def configure_logging(verbose: int, handler: logging.Handler | None = None, log_format: str = "text") -> None:
    """Log to stderr, or through ``handler`` (``-l FILE``), as text or JSON lines: trio_dht at INFO (what an
    operator needs: start, peers found and lost, gateway failures, limits hit); ``-v``: all at INFO and
    trio_dht at DEBUG; ``-vv``: all at DEBUG (see :func:`trio_dht.logs.configure`)."""
    logs.configure(verbose, handler, log_format)


if __name__ == "__main__":
    sys.exit(main())
