"""The flavor's view of the process serving it: the log level a scoring server shows."""

import pytest


def test_log_level_from_environment(monkeypatch):
    import logging

    from mlflow.exceptions import MlflowException

    from smolora_mlflow.flavor.server_env import log_to_stderr_if_asked

    monkeypatch.setenv("SMOLORA_LOG_LEVEL", "loud")
    with pytest.raises(MlflowException, match="must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"):
        log_to_stderr_if_asked()
    package_logger = logging.getLogger("smolora_mlflow")
    before = (package_logger.level, list(package_logger.handlers))
    monkeypatch.setenv("SMOLORA_LOG_LEVEL", "debug")
    try:
        log_to_stderr_if_asked()
        log_to_stderr_if_asked()  # idempotent: one handler
        added = [h for h in package_logger.handlers if getattr(h, "smolora_stderr", False)]
        assert package_logger.level == logging.DEBUG and len(added) == 1
    finally:
        package_logger.setLevel(before[0])
        package_logger.handlers[:] = before[1]
