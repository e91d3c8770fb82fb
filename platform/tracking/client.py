"""How dynroute's MLflow clients meet a server: its limits on values, the HTTP settings that make
a dead server fail fast, and what a failed artifact store looks like from the client.

`tracker.py`, `register.py` and `registered_versions.py` share these, so a limit or a setting
lives in one place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

# Server-side limits of MLflow 3.17 (mlflow/utils/validation.py); a test pins them to MLflow's own.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
PARAMS_TAGS_PER_BATCH = 100

# Client HTTP settings, used unless the environment already sets them. MLflow's defaults (7 retries
# with backoff factor 2, 120 s timeout) let a dead server stall a training for minutes; metrics do
# their own retrying in the buffer, and the rest should fail fast with a clear error.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def truncate(value: str, limit: int) -> str:
    """`value` cut to `limit` characters with a visible `...[truncated N chars]` marker (the
    server would cut it silently)."""
    if len(value) <= limit:
        return value
    marker = f"...[truncated {len(value)} chars]"
    return value[: limit - len(marker)] + marker


def mlflow_client(uri: str) -> MlflowClient:
    """A client of `uri` for tracking and its registry, with the fail-fast HTTP settings."""
    configure_http_client()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def configure_http_client() -> None:
    """Apply `HTTP_DEFAULTS` where the environment sets nothing (MLflow reads them per request),
    and stop MLflow printing its own "View run … at: <tracking URI>" lines: they show the URI
    as given, password included. The Tracker prints the link with the password masked."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


class ArtifactStoreError(MlflowException):
    """The tracking server could not store an artifact: its artifact store failed behind it."""


@contextlib.contextmanager
def storing(what: str, uri: str | None) -> Iterator[None]:
    """Turn the bare "too many 500 error responses" of a failed artifact upload into an error
    that says where the fault is and what to do. Artifacts go through the server's proxy
    (`mlflow-artifacts`), so an unreachable S3 endpoint or bucket reaches the client as HTTP 500
    on that API only."""
    try:
        yield
    except MlflowException as err:
        if "mlflow-artifacts" not in str(err) or err.get_http_status_code() < 500:
            raise
        raise ArtifactStoreError(
            f"the MLflow server {uri} could not store {what}: its artifact store (the server's "
            f"--artifacts-destination, e.g. an S3 bucket) failed with HTTP "
            f"{err.get_http_status_code()}. The store is unreachable or refuses the server's "
            f"credentials; the server's log says which (server.log in the root of a server "
            f"dynroute started). Bring the store back and run again: the run stays as far as "
            f"it got.", error_code=err.error_code) from err
