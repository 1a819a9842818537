"""airflow_pgbg: run batches of SQL statements inside PostgreSQL as pg_background workers."""

__version__ = "0.3.8"

ENGINE_VERSION = "1.1.8"
"""The engine version (``airflow_pgbg/sql``) this package's Python code needs and installs."""
