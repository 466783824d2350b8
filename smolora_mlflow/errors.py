"""Errors raised at MLflow surfaces, made in one place.

An :class:`~mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE`` is what MLflow's scoring
server and REST handlers turn into a 400, and what ``smolora`` commands turn into exit code 2. Part of the
foundation: MLflow is imported only when an error is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.exceptions import MlflowException


def invalid_input(message: str) -> MlflowException:
    """The exception for a bad input; ``message`` names the field, the value and the fix.

    Example:
        >>> raise invalid_input("`max_new_tokens` must be positive, got 0; pass 1 or more.")  # doctest: +SKIP
    """
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)
