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
import dataclasses
import errno
import os

import orbax.checkpoint as ocp

from jaxlayouts.results import WriteError


class Checkpoints:
    def __init__(self, directory: str, every: int, keep: int = 3):
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                               enable_async_checkpointing=True)
        self.directory = os.path.abspath(directory)
        with self.writing():
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    @contextlib.contextmanager
    def writing(self):
        """A save that fails (a full disk, a lost folder; orbax reports some as RESOURCE_EXHAUSTED)
        is a :class:`WriteError` naming the directory, never mistaken for device memory."""
        try:
            yield
        except Exception as error:
            raise WriteError(getattr(error, "errno", None) or errno.EIO,
                             f"--checkpoint_dir {self.directory}: the checkpoint could not be written "
                             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error

    def save(self, step: int, state, record: dict) -> bool:
        """Save if ``step`` is on the interval; returns whether a save started (a failure of an
        earlier, asynchronous save surfaces here or in :meth:`close`)."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(record))
        with self.writing():
            return self.manager.save(step, args=args)

    def latest_record(self) -> tuple[int, dict]:
        """``(step, run record)`` of the latest complete checkpoint, without reading its arrays."""
        step = self.manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.manager.directory}")
        return step, self.manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore())).run

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


RUN_SETTINGS = ("seq_len", "global_batch", "seed")
"""Run settings a resumed run must share with its checkpoint: the data position (``next_step``)
only means the same batches under the same ones."""


def record_of(run, next_step: int) -> dict:
    """What a checkpoint records of its run (``mismatch`` compares it with the run restoring it)."""
    return {"next_step": next_step, "layout": str(run.layout), "model": run.model.name,
            "model_config": dataclasses.asdict(run.model), **{name: getattr(run, name) for name in RUN_SETTINGS}}


def mismatch(record: dict, run) -> str | None:
    """Why a checkpoint with ``record`` cannot resume ``run``: another model (its shapes), or other
    run settings (named with both values); None when it can."""
    saved_model = record.get("model_config")
    model = dataclasses.asdict(run.model)
    if record.get("model") != run.model.name or (saved_model is not None and saved_model != model):
        shapes = "" if saved_model is None else ": " + ", ".join(
            f"{k} {saved_model.get(k)} there, {v} here" for k, v in model.items() if saved_model.get(k) != v)
        return (f"it holds {record.get('model')!r} and this run trains {run.model.name!r}{shapes}; give the same "
                "--model, or another --checkpoint_dir")
    differ = [f"{name} {record[name]} there, {getattr(run, name)} here" for name in RUN_SETTINGS
              if name in record and record[name] != getattr(run, name)]
    if differ:
        return (f"it was saved by a run with other settings ({'; '.join(differ)}); resuming would continue "
                "another run's data: give the same values, or another --checkpoint_dir")
    return None
