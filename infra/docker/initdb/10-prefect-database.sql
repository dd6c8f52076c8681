-- Runs once, when the postgres volume is first initialised: POSTGRES_DB creates the
-- MLflow database; Prefect gets its own (both keep an alembic_version table).
CREATE DATABASE prefect;
