"""The tracker of a run that logs nothing: tracking is off, or this is not the main process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class NullTracker:
    """Does nothing, with the tracker's interface; imports nothing from MLflow."""

    run_id = None
    prompt_format = "plain"
    prompt_format_reason = ""

    @contextlib.contextmanager
    def run(self, resume_run_id: str | None = None) -> Iterator[str | None]:
        yield None

    def callbacks(self) -> list:
        return []

    def finish(self, trainer, adapter_dir, metrics) -> None:
        pass

    def log_training_setup(self, trainer) -> None:
        pass

    def log_upstream_configs(self, lora_config, trainer_args) -> None:
        pass

    def log_table_rows(self, rows: list[dict], artifact_file: str) -> None:
        pass
