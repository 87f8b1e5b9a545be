"""Start N processes of one command on this machine as one JAX distributed run (CPU + gloo).

    python -m jaxlayouts.launch 2 -- python -m jaxlayouts.bench --mesh dp=2,fsdp=2,tp=2

For testing the multi-process path without a cluster (``launch/local.sh`` wraps it). Each
process gets ``JAXLAYOUTS_COORDINATOR_ADDRESS``, ``JAXLAYOUTS_NUM_PROCESSES`` and
``JAXLAYOUTS_PROCESS_ID``; the bench reads them. When any process fails, the others are stopped
and the launcher exits with that process's code, so a failure is never a hang. When the launcher
itself dies, even by ``kill -9``, Linux kills the workers (``die_with_parent``, which the bench
calls first thing; a command of your own should call it too).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxlayouts.distributed import ENV_PREFIX


PARENT_PID_VARIABLE = f"{ENV_PREFIX}DIE_WITH_PARENT"
LIBRARY_CHATTER = (b"[Gloo]",)
"""Line prefixes that libraries print to stdout (gloo's "Rank 0 is connected to 1 peer ranks")."""


def die_with_parent():
    """If started with ``JAXLAYOUTS_DIE_WITH_PARENT=<pid>`` (the sweep does this), ask Linux to
    SIGKILL this process when that parent dies, so no orphan keeps a device busy. Done in the child
    itself: a ``preexec_fn`` would make Python fork a multithreaded parent."""
    parent = os.environ.pop(PARENT_PID_VARIABLE, None)
    if parent is None or sys.platform != "linux":
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != int(parent):  # the parent died before the call above
        os._exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, command: list[str], grace_s: float = 10.0) -> int:
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for index in range(num_processes):
        env = dict(os.environ, **{f"{ENV_PREFIX}COORDINATOR_ADDRESS": address,
                                  f"{ENV_PREFIX}NUM_PROCESSES": str(num_processes),
                                  f"{ENV_PREFIX}PROCESS_ID": str(index),
                                  PARENT_PID_VARIABLE: str(os.getpid())})  # killed with the launcher
        env.pop("XLA_FLAGS", None)  # each process asks for its own share of the devices
        try:
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE))
        except OSError as error:
            _stop(procs, grace_s)
            print(f"launch: cannot start {command[0]!r}: {error.strerror}; give a command that runs, e.g. "
                  "python -m jaxlayouts.bench", file=sys.stderr)
            return 2
    forwarders = [threading.Thread(target=forward_output, args=(p.stdout, index == 0), daemon=True)
                  for index, p in enumerate(procs)]
    for thread in forwarders:
        thread.start()
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(procs, grace_s)
                for thread in forwarders:
                    thread.join(timeout=grace_s)
                print(f"launch: a process exited with {failed[0]}; stopped the others", file=sys.stderr)
                return failed[0] if failed[0] > 0 else 128 - failed[0]
            if all(c == 0 for c in codes):
                for thread in forwarders:
                    thread.join()
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs, grace_s)
        return 130


def forward_output(stream, is_first: bool) -> None:
    """Pass a worker's stdout on, as bytes: process 0's lines to stdout, everything else (the other
    processes' output, the collectives library's connection chatter) to stderr. The pipe is read
    to its end whatever happens to the reader's own streams, so a worker never blocks on it."""
    for line in stream:
        to_stdout = is_first and not line.startswith(LIBRARY_CHATTER)
        target = sys.stdout if to_stdout else sys.stderr
        try:
            target.buffer.write(line)
            target.flush()
        except (OSError, ValueError):  # our stdout or stderr is gone (a closed pipe): drop the line
            pass


def _stop(procs, grace_s: float):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxlayouts.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("num_processes", type=int)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.num_processes < 1 or not command:
        parser.error("give a process count >= 1 and a command after --, e.g. 2 -- python -m jaxlayouts.bench")
    return launch(args.num_processes, command)


if __name__ == "__main__":
    sys.exit(main())
