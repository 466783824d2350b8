"""Training data: local files, hub datasets, in-memory objects and the bundled demo set.

:mod:`~smolora_mlflow.data.sources` reads a source into rows; :mod:`~smolora_mlflow.data.prepare` checks,
normalises and splits them into the layouts TRL reads and records them as MLflow dataset inputs.
"""

from __future__ import annotations

from smolora_mlflow.data.preference import as_chat_turns, as_scored, prepare_method_data
from smolora_mlflow.data.prepare import PreparedData, as_chat, detect_format, mlflow_dataset, prepare_data
from smolora_mlflow.data.sources import DataError, Format, load_raw

__all__ = [
    "DataError", "Format", "PreparedData", "as_chat", "as_chat_turns", "as_scored", "detect_format",
    "load_raw", "mlflow_dataset", "prepare_data", "prepare_method_data",
]
