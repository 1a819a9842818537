"""Differences between the Airflow versions this package supports (3.1, 3.2, 3.3), in one place.

Imports that moved go through ``apache-airflow-providers-common-compat`` (as the official providers
do); behaviour that differs is decided here from the running Airflow version, the way the official
providers keep a ``version_compat`` module of their own.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from airflow import __version__ as _airflow_version
from airflow.providers.common.compat.sdk import (
    AirflowException,
    AirflowTaskTimeout,
    BaseOperator,
    BaseOperatorLink,
    conf,
    hookimpl,
)
from airflow.triggers.base import BaseTrigger
from packaging.version import Version

AIRFLOW_VERSION = Version(Version(_airflow_version).base_version)
AIRFLOW_V_3_2_PLUS = Version("3.2.0") <= AIRFLOW_VERSION
AIRFLOW_V_3_3_PLUS = Version("3.3.0") <= AIRFLOW_VERSION

TRIGGER_HAS_ON_KILL = "on_kill" in BaseTrigger.__dict__
"""Airflow 3.3 calls ``BaseTrigger.on_kill()`` when a user marks a deferred task or clears it; before,
a trigger only sees ``cleanup()``, on user action and triggerer restart alike."""

CAN_START_FROM_TRIGGER = AIRFLOW_V_3_3_PLUS
"""Airflow 3.3's triggerer starts a task with ``start_from_trigger`` itself and renders its templated
fields; 3.1 and 3.2 store the flag but their triggerer has no such path."""

TASK_FAILED_EVENT_RETRIES = AIRFLOW_V_3_3_PLUS
"""Airflow 3.3 retries a task that a trigger ended with ``TaskFailedEvent`` (and runs its retry
callback); 3.1 and 3.2 fail it for good, so there a failure resumes on a worker, which raises."""


def lineage_reported_for(task: Any) -> bool:
    """Whether Airflow's OpenLineage listener reports ``task``: the provider is installed, a transport
    is configured and its emission policy (``selective_enable``, ``disabled_for_operators``, rules)
    lets this task through. The listener runs only in a worker's task process, so such a task must
    start and end there. Without the provider nothing of it is imported."""
    if importlib.util.find_spec("airflow.providers.openlineage") is None:
        return False
    try:
        from airflow.providers.openlineage.conf import is_disabled

        if is_disabled():  # no transport configured, or turned off
            return False
        from airflow.providers.openlineage.utils.emission_policy import resolve_task_emission_policy

        return resolve_task_emission_policy(task, task.dag_id, task.task_id).emit
    except Exception:  # an older provider, or a configuration it cannot read: it reports nothing either
        return False


__all__ = [
    "AIRFLOW_VERSION",
    "AIRFLOW_V_3_2_PLUS",
    "AIRFLOW_V_3_3_PLUS",
    "CAN_START_FROM_TRIGGER",
    "TASK_FAILED_EVENT_RETRIES",
    "TRIGGER_HAS_ON_KILL",
    "AirflowException",
    "AirflowTaskTimeout",
    "BaseOperator",
    "BaseOperatorLink",
    "conf",
    "hookimpl",
    "lineage_reported_for",
]
