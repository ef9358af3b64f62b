"""``trio-dht`` and ``python -m trio_dht``: run a node, and by default its REST proxy, until SIGINT/SIGTERM.

``trio-dht client ...`` is the device-side proxy client instead (:mod:`trio_dht.client.cli`).

Exit codes: 0 after SIGINT/SIGTERM (or ``--help``/``--version``), 1 when a task failed (one line on stderr
says why; ``-v`` adds the traceback), 2 for bad flags.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Sequence

import trio

from trio_dht.app import run
from trio_dht.config import parse_args
from trio_dht.exceptions import leaf_exceptions

log = logging.getLogger("trio_dht")


def tune_garbage_collector() -> None:
    """A server's settings (the process's, not a library's to make): move what start-up allocated out of the
    collector's sight, and collect young objects less often. Under load, CPython's default thresholds ran
    full collections that paused requests for 50-400 ms while freeing almost nothing (bench/RESULTS.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 100)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program with ``argv`` (default ``sys.argv[1:]``) and return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["client"]:
        from trio_dht.client.cli import client_main  # the device-side proxy client, with its own flags

        return client_main(argv[1:])
    config = parse_args(argv)
    configure_logging(config.verbose)
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
        print(f"trio-dht: error: {describe_failure(exc)}", file=sys.stderr)
        return 1
    return 0


def configure_logging(verbose: int) -> None:
    """Log to stderr: trio_dht at INFO (the startup lines); ``-v``: all at INFO; ``-vv``: all at DEBUG."""
    root_level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(root_level)
    logging.getLogger("trio_dht").setLevel(logging.DEBUG if verbose else logging.INFO)


def describe_failure(exc: BaseException) -> str:
    """One line naming every exception inside ``exc`` (ExceptionGroups unwrapped), e.g. ``OSError: ...``."""
    return "; ".join(
        f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
        for leaf in leaf_exceptions(exc)
        if not isinstance(leaf, KeyboardInterrupt)
    )


if __name__ == "__main__":
    sys.exit(main())
