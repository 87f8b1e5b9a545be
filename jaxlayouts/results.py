"""Result files: JSON lines of result rows (the bench's and the sweep's), only ever appended to.

A file is refused unless every complete line is a result row (a JSON object with ``status``;
with ``keyed``, a ``key`` too); a line torn by a kill during a write (it starts with ``{`` and does
not parse) stays where it is and is skipped. Each row is appended in one write, synced to disk.
"""

from __future__ import annotations

import json
import os
import pathlib

from jaxlayouts.schema import InvalidInput, creatable


class Results:
    """An append-only JSONL of result rows; the last row of a key is its result.

    The file is never rewritten: a retried point appends its new row, and a line torn by a kill
    during a write stays where it is (a newline is appended before the next row, so it stands
    alone and is skipped when read). A file that is not such a JSONL is refused."""

    def __init__(self, path: str | pathlib.Path, knob: str = "out", keyed: bool = True):
        self.path, self.knob, self.keyed = pathlib.Path(path), knob, keyed
        self.rows: dict[str, dict] = {}
        self._needs_newline = False
        if self.path.is_dir() or not creatable(self.path):
            raise InvalidInput(knob, f"{self.path} is a directory or cannot be written; give a results file, "
                               f"e.g. --{knob} results/run.jsonl")
        if self.path.exists():
            self._load()

    def _load(self):
        raw = self.path.read_bytes()
        for number, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if line.lstrip().startswith(b"{"):
                    continue  # torn by a kill during a write
                row = None
            keyed = not self.keyed or isinstance(row, dict) and isinstance(row.get("key"), str)
            if not (isinstance(row, dict) and keyed and "status" in row):
                raise InvalidInput(self.knob, f"{self.path}:{number} is not a result row; give a new file "
                                   "or one of results")
            self.rows[row.get("key", number)] = row
        self._needs_newline = bool(raw) and not raw.endswith(b"\n")

    def create(self) -> "Results":
        """Make the (empty) file now if it does not exist, so that a path no row could be written
        to is found before any run: :class:`InvalidInput` for the knob that named it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as error:
            raise InvalidInput(self.knob, f"{self.path}: cannot be written ({error.strerror}); give a file in a "
                               f"writable folder, e.g. --{self.knob} results/run.jsonl") from None
        return self

    def append(self, row: dict):
        """Append ``row`` as one line in one write, synced to disk."""
        line = ("\n" if self._needs_newline else "") + json.dumps(row, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._needs_newline = False
        self.rows[row.get("key", len(self.rows))] = row
