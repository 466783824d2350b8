"""Checkpoints: which ones are complete, which one to resume from, and which MLflow run they belong to.

transformers writes ``checkpoint-N`` folders piece by piece; a process killed half-way leaves a folder
that looks like a checkpoint but is not one. After the Trainer has finished a checkpoint we write a small
marker (atomically: temporary name, then rename), and only marked folders count as resumable.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from transformers import TrainerCallback

from smolora_mlflow.constants import RUN_ID_FILE
from smolora_mlflow.refs import is_run_id

MARKER_FILE = "smolora_checkpoint.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def is_complete(ckpt: Path) -> bool:
    return (ckpt / MARKER_FILE).is_file() and (ckpt / "trainer_state.json").is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def read_run_id(ckpt: str | os.PathLike) -> str | None:
    f = Path(ckpt) / RUN_ID_FILE
    return f.read_text(encoding="utf-8").strip() or None if f.is_file() else None


def resolve_resume(value: str | None, output_dir: str | os.PathLike, checkpoint_dir_of_run=None) -> Path | None:
    """Turn ``resume_from_checkpoint`` (a folder, ``latest`` or an MLflow run id) into a checkpoint folder.

    Args:
        value: what the user asked for; ``None`` means a fresh run.
        output_dir: where ``latest`` looks.
        checkpoint_dir_of_run: callable mapping a run id to the folder its checkpoints were written to.

    Raises:
        ValueError: naming the value and what was looked for, when nothing resumable is found.
    """
    if value is None:
        return None
    if value == "latest":
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise ValueError(
                f"`resume_from_checkpoint`='latest' found no complete checkpoint in `{output_dir}`; "
                "set `save_steps` > 0 when training so checkpoints are written."
            )
        return ckpts[-1]
    path = Path(value)
    if path.is_dir():
        if _CKPT_RE.match(path.name):
            if not is_complete(path):
                raise ValueError(f"`resume_from_checkpoint`: `{path}` is an incomplete checkpoint; "
                                 "resume from an earlier one or from `latest`.")
            return path
        ckpts = list_checkpoints(path)
        if ckpts:
            return ckpts[-1]
        raise ValueError(f"`resume_from_checkpoint`: `{path}` holds no complete checkpoint-N folder.")
    if is_run_id(value) and checkpoint_dir_of_run is not None:
        folder = checkpoint_dir_of_run(value)
        ckpts = list_checkpoints(folder) if folder else []
        if not ckpts:
            raise ValueError(f"`resume_from_checkpoint`: MLflow run {value} has no complete checkpoint on this "
                             f"machine (looked in `{folder}`).")
        return ckpts[-1]
    raise ValueError(f"`resume_from_checkpoint`={value!r} is neither a checkpoint folder, `latest`, nor an "
                     "MLflow run id.")


class CheckpointMarkerCallback(TrainerCallback):
    """Marks a checkpoint complete, and ties it to its MLflow run, once the Trainer has written it."""

    def __init__(self, run_id_getter, on_complete=None):
        self._run_id_getter = run_id_getter
        self._on_complete = on_complete  # called with (checkpoint folder, step) once it is marked

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        run_id = self._run_id_getter()
        if run_id:
            write_atomic(ckpt / RUN_ID_FILE, run_id)
        write_atomic(ckpt / MARKER_FILE, json.dumps({"step": state.global_step, "run_id": run_id}))
        if self._on_complete is not None:
            self._on_complete(ckpt, state.global_step)
