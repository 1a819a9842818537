"""The operator extra link to a task instance's batch page (served by airflow_pgbg.plugins)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast
from urllib.parse import quote, urlsplit

from airflow.configuration import conf
from airflow.sdk.bases.xcom import BaseXCom

from airflow_pgbg.compat import BaseOperatorLink
from airflow_pgbg.identity import XCOM_BATCH_KEY

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.bases.xcom import TIKeyProtocol
    from airflow.sdk.types import TaskInstanceKey

PLUGIN_PREFIX = "/pgbg"


def batch_page_path(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """Path of the batch page of one task instance, below the API server's base URL."""
    return (
        f"{PLUGIN_PREFIX}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
        f"/tasks/{quote(task_id, safe='')}?map_index={map_index}"
    )


class PgBackgroundBatchLink(BaseOperatorLink):
    """The "PG Background batch" link: the live log_background of the batch this try launched."""

    name = "PG Background batch"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        # Only a try that launched a batch has one to show.
        # Airflow's TaskInstanceKey has every field of the protocol get_value() declares.
        if not BaseXCom.get_value(ti_key=cast("TIKeyProtocol", ti_key), key=XCOM_BATCH_KEY):
            return ""
        # Relative to the server, under the path prefix the API server may be deployed at.
        prefix = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
        return prefix + batch_page_path(ti_key.dag_id, ti_key.run_id, ti_key.task_id, ti_key.map_index)
