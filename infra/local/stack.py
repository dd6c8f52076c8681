"""The team stack on one host, started natively: PostgreSQL, an S3-compatible store, the
MLflow server, the Prefect server and a worker, a Ray head.

The service list and the variables a client exports are declared here once; the compose
file in infra/docker/ is checked against them.
"""

SERVICES = ("postgres", "s3", "mlflow", "prefect-server", "prefect-worker", "ray-head")
EXPORTED_ENV = (
    "MLFLOW_TRACKING_URI",
    "PREFECT_API_URL",
    "RAY_ADDRESS",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)
