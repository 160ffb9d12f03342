"""
One gateway worker, started by the supervisor (pushd.gateway.workers):

    python -m pushd.gateway.worker INDEX COUNT [pushd-gateway options ...]

The gateway's own options, read as ``twistd pushd-gateway`` reads them (config file
included), then made a worker's: one process (``--workers`` ignored, whatever a config file
says), its listeners opened with SO_REUSEPORT, and its node id ID-INDEX when ``--node-id``
was given. It logs to stdout without timestamps (the supervisor adds them when it relays
the line) and stops when its stdin closes: the supervisor is gone.
"""

from __future__ import annotations

import os
import signal
import stat
import sys

from twisted.internet import protocol, stdio
from twisted.logger import FileLogObserver, Logger, eventAsText, globalLogBeginner
from twisted.python import usage

log = Logger()


def make_worker(options, index: int) -> None:
    """Turn parsed gateway options into worker ``index``'s."""
    from pushd.gateway.workers import worker_node_id

    options["workers"] = 1
    options["reuse-port"] = 1
    if options.get("node-id"):
        options["node-id"] = worker_node_id(options["node-id"], index)


class _Supervisor(protocol.Protocol):
    """The read end of the pipe on stdin: closed when the supervisor exits."""

    def __init__(self, reactor):
        self.reactor = reactor

    def connectionLost(self, reason):
        if self.reactor.running:
            log.warn("the supervisor is gone (stdin closed): stopping")
            self.reactor.stop()


def _stop_once_on_signals(reactor):
    """
    SIGTERM/SIGINT stop the worker once. It may get two: the supervisor forwards one, and
    systemd (KillMode=control-group) or a terminal signals the whole group as well; Twisted's
    own handler would call reactor.stop() twice and log a ReactorNotRunning traceback. The
    handler already installed (Twisted's, or a drain's) is kept, and called once.
    """
    state = {"stopping": False}

    def wrap(previous):
        def handler(signum, frame):
            if state["stopping"]:
                return
            state["stopping"] = True
            if callable(previous):
                previous(signum, frame)
            else:
                reactor.callFromThread(reactor.stop)

        return handler

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, wrap(signal.getsignal(sig)))


def _format(event) -> str:
    return eventAsText(event, includeTimestamp=False, includeSystem=True) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        index, count, args = int(argv[0]), int(argv[1]), argv[2:]
    except (IndexError, ValueError):
        print("usage: python -m pushd.gateway.worker INDEX COUNT [pushd-gateway options]", file=sys.stderr)
        return 64
    from pushd.gateway import tap

    options = tap.Options()
    try:
        options.parseOptions(args)
    except usage.UsageError as e:
        print(f"pushd-gateway worker {index}: {e}", file=sys.stderr)
        return 64
    make_worker(options, index)
    globalLogBeginner.beginLoggingTo([FileLogObserver(sys.stdout, _format)], redirectStandardIO=False)
    from twisted.internet import reactor

    try:
        top = tap.makeService(options, reactor)
    except usage.UsageError as e:
        log.critical("worker {index}: {e}", index=index, e=str(e))
        return 64
    log.info("worker {index} of {count} (pid {pid})", index=index, count=count, pid=os.getpid())
    reactor.callWhenRunning(top.startService)
    reactor.callWhenRunning(_stop_once_on_signals, reactor)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    if stat.S_ISFIFO(os.fstat(0).st_mode):
        # Started by the supervisor (stdin a pipe; /dev/null or a terminal otherwise).
        # stdout stays the log's: the watch's write side goes nowhere.
        stdio.StandardIO(_Supervisor(reactor), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY), reactor=reactor)
    if signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, None):
        # Forwarded by the supervisor; the default action would kill the worker.
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(
            log.info, "SIGHUP: providers.json and the enrolment secrets are re-read when they change"))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
