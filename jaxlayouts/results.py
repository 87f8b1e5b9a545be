"""Result files: JSON lines of result rows (the bench's and the sweep's), only ever appended to.

A file is refused unless every complete line is a result row (a JSON object with ``status``;
with ``keyed``, a ``key`` too); a line torn by a kill during a write (it starts with ``{`` and does
not parse) stays where it is and is skipped. A device, FIFO or socket (``/dev/full``, a link to
``/dev/zero``) is refused before anything runs; ``/dev/null`` keeps no file (rows are discarded). Each row is appended whole or not at all: written
by a loop that finishes short writes, synced to disk, and cut back off when the disk fills part
way (the error names the file). Writers take an exclusive ``flock`` on the file: a sweep holds it
for its whole run, so a second sweep on the same file is refused; a bench's one row waits a
little for it, then fails naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import subprocess
import time

from jaxlayouts.schema import InvalidInput, creatable, json_value, read_input, refuse_special

LOCK_WAIT_S = 10.0
"""How long one row's append waits for another writer's lock before it fails."""


class WriteError(OSError):
    """A write that did not complete: the file (or folder) it was for, and why."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_all(fd: int, data: bytes, path) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write fewer than asked): a write
    that fails, or makes no progress, is a :class:`WriteError` naming ``path``."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError as error:
            raise WriteError(error.errno, f"{path}: {error.strerror} after {len(data) - len(view)} of "
                             f"{len(data)} bytes") from None
        if written <= 0:
            raise WriteError(errno.EIO, f"{path}: the write made no progress after {len(data) - len(view)} of "
                             f"{len(data)} bytes")
        view = view[written:]


class Results:
    """An append-only JSONL of result rows; the last row of a key is its result.

    The file is never rewritten: a retried point appends its new row, and a line torn by a kill
    during a write stays where it is (a newline is appended before the next row, so it stands
    alone and is skipped when read). A file that is not such a JSONL is refused. ``path=None``
    keeps the rows in memory only (a sweep's non-writing processes)."""

    def __init__(self, path: str | pathlib.Path | None, knob: str = "out", keyed: bool = True):
        if path is not None and os.path.realpath(path) == os.devnull:
            path = None  # the null device: rows are discarded, as asked (``sweep --dry-run --out /dev/null``)
        self.path = pathlib.Path(path) if path is not None else None
        self.knob, self.keyed = knob, keyed
        self.rows: dict[str, dict] = {}
        self._needs_newline = False
        self._held: int | None = None
        if self.path is None:
            return
        refuse_special(self.path, knob, "results/run.jsonl")
        if self.path.is_dir() or not creatable(self.path):
            raise InvalidInput(knob, f"{self.path} is a directory or cannot be written; give a results file, "
                               f"e.g. --{knob} results/run.jsonl")
        if self.path.exists():
            self._load()

    def _load(self):
        try:
            raw = read_input(self.path, self.knob)
        except OSError as error:
            raise InvalidInput(self.knob, f"{self.path}: cannot be read ({error.strerror}); give a results file, "
                               f"e.g. --{self.knob} results/run.jsonl") from None
        self.rows = {}
        for number, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                row = json_value(line)
            except (ValueError, UnicodeDecodeError) as error:
                if not isinstance(error, UnicodeDecodeError) and "nested deeper" in str(error):
                    raise InvalidInput(self.knob, f"{self.path}:{number}: {error}; give a new file or one of "
                                       "results") from None
                if line.lstrip().startswith(b"{"):
                    continue  # torn by a kill during a write
                row = None
            keyed = not self.keyed or isinstance(row, dict) and isinstance(row.get("key"), str)
            if not (isinstance(row, dict) and keyed and "status" in row):
                raise InvalidInput(self.knob, f"{self.path}:{number} is not a result row; give a new file "
                                   "or one of results")
            self.rows[row.get("key", number)] = row
        self._needs_newline = bool(raw) and not raw.endswith(b"\n")

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)

    def create(self) -> "Results":
        """Make the (empty) file now if it does not exist, so that a path no row could be written
        to is found before any run: :class:`InvalidInput` for the knob that named it. A file
        another process is writing (a sweep holds its lock) is refused too."""
        if self.path is None:
            return self
        try:
            fd = self._open()
        except OSError as error:
            raise InvalidInput(self.knob, f"{self.path}: cannot be written ({error.strerror}); give a file in a "
                               f"writable folder, e.g. --{self.knob} results/run.jsonl") from None
        try:
            if self._held is None:
                self._lock(fd, wait_s=0)
        finally:
            os.close(fd)
        return self

    def _lock(self, fd: int, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise InvalidInput(self.knob, f"{self.path} is being written by another process (a sweep "
                                       "holds it while it runs); wait for it to finish, or give another file, "
                                       f"e.g. --{self.knob} results/other.jsonl") from None
                time.sleep(0.1)

    def hold(self) -> "Results":
        """Take the file's lock until :meth:`release` (or this process ends), and read it again
        under the lock: a second writer is refused (:class:`InvalidInput`) instead of doubling rows."""
        if self.path is None or self._held is not None:
            return self
        fd = self._open()
        try:
            self._lock(fd, wait_s=0)
        except InvalidInput:
            os.close(fd)
            raise
        self._held = fd
        self._load()
        return self

    def release(self) -> None:
        if self._held is not None:
            os.close(self._held)  # closing the descriptor drops the lock
            self._held = None

    def append(self, row: dict):
        """Append ``row`` as one whole line, synced to disk; a write that fails part way is cut
        off again and raised as a :class:`WriteError` naming the file."""
        line = ("\n" if self._needs_newline else "") + json.dumps(row, default=str) + "\n"
        if self.path is not None:
            fd = self._held if self._held is not None else self._open()
            try:
                if self._held is None:
                    self._lock(fd, wait_s=LOCK_WAIT_S)
                start = os.fstat(fd).st_size
                try:
                    write_all(fd, line.encode(), self.path)
                    os.fsync(fd)
                except BaseException as error:  # a full disk, or Ctrl-C part way through the row
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)  # no half row stays behind
                    if isinstance(error, OSError) and not isinstance(error, WriteError):
                        raise WriteError(error.errno, f"{self.path}: {error.strerror}") from None
                    raise
            finally:
                if fd != self._held:
                    os.close(fd)
        self._needs_newline = False
        self.rows[row.get("key", len(self.rows))] = row


def commit() -> str | None:
    """The checkout's git commit, short, with ``+dirty`` when tracked files have changes; None
    without git or outside a checkout. The GPU kit, grid rows and target_check record it."""
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
