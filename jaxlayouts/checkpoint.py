"""Sharded train-state checkpoints with orbax, restorable under another layout or device count.

Each checkpoint holds the train state (float32 master weights, AdamW state, step) and a JSON
record of the run: layout, model, batch shape, seed and the data position (the next step, since
synthetic batches are a function of ``(seed, step)``). Saves are asynchronous; orbax writes each
one into a temporary directory and renames it into place only when complete, so a crash during a
save leaves the previous checkpoint intact. Restoring reads every array straight into the
shardings of the *current* layout (any mesh, any device count): resharding happens on read.
"""

from __future__ import annotations

import contextlib
import errno
import os

import orbax.checkpoint as ocp

from jaxlayouts.results import WriteError


class Checkpoints:
    def __init__(self, directory: str, every: int, keep: int = 3):
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                               enable_async_checkpointing=True)
        with self.writing():
            self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    @contextlib.contextmanager
    def writing(self):
        """A save that fails (a full disk, a lost folder; orbax reports some as RESOURCE_EXHAUSTED)
        is a :class:`WriteError` naming the directory, never mistaken for device memory."""
        try:
            yield
        except Exception as error:
            where = getattr(getattr(self, "manager", None), "directory", None)
            raise WriteError(getattr(error, "errno", None) or errno.EIO,
                             f"--checkpoint_dir {where or 'directory'}: the checkpoint could not be written "
                             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error

    def save(self, step: int, state, record: dict) -> bool:
        """Save if ``step`` is on the interval; returns whether a save started (a failure of an
        earlier, asynchronous save surfaces here or in :meth:`close`)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(record))
        with self.writing():
            return self.manager.save(step, args=args)

    def restore(self, abstract_state):
        """The latest complete checkpoint, laid out like ``abstract_state`` (ShapeDtypeStructs
        with shardings); returns ``(state, record)``."""
        step = self.manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.manager.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), run=ocp.args.JsonRestore()))
        return restored.state, restored.run

    def close(self):
        with self.writing():
            self.manager.wait_until_finished()
            self.manager.close()
