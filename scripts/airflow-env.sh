# Sourced by demo.sh and ui.sh: the throwaway Airflow home the demo runs in.
export AIRFLOW_HOME=${AIRFLOW_HOME:-$PWD/.airflow-home}
export AIRFLOW__CORE__DAGS_FOLDER=$PWD/example_dags
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=admin:admin
