"""Sharded train-state checkpoints with orbax, restorable under another layout or device count.

Each checkpoint holds the train state (float32 master weights, AdamW state, step) and a JSON
record of the run: layout, model, batch shape, seed and the data position (the next step, since
synthetic batches are a function of ``(seed, step)``). Saves are asynchronous; orbax writes each
one into a temporary directory and renames it into place only when complete, so a crash during a
save leaves the previous checkpoint intact. Restoring reads every array straight into the
shardings of the *current* layout (any mesh, any device count): resharding happens on read.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str, every: int, keep: int = 3):
        options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def save(self, step: int, state, record: dict) -> bool:
        """Save if ``step`` is on the interval; returns whether a save started."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), run=ocp.args.JsonSave(record))
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
        self.manager.wait_until_finished()
        self.manager.close()
