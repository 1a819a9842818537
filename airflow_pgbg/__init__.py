"""airflow_pgbg: run batches of SQL statements inside PostgreSQL as pg_background workers."""

__version__ = "0.1.0"
