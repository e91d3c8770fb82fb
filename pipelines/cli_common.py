"""What every `dynroute` command handler shares: the error exit, the params file with the
environment's overrides, the MLflow server a command uses, and the --fast/--no-fast switch of the
inference commands."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from dynroute.platform.config.params import Params, ParamsError
from dynroute.platform.config.params import load_params as read_params
from dynroute.platform.config.settings import Settings
from dynroute.platform.tracking.server import MlflowServer
from dynroute.platform.url_secrets import SettingsError, mask_secrets


def fail(message: str) -> typer.Exit:
    """Print `message` as an error, any password in a URL it quotes masked, and give the exit
    to raise (status 1)."""
    typer.echo(f"error: {mask_secrets(message)}", err=True)
    return typer.Exit(1)


def load_params(path: Path):
    """params.yaml with the endpoints the environment overrides (platform/config/settings.py):
    MLFLOW_TRACKING_URI over tracking.uri, DYNROUTE_OPTUNA_STORAGE over tune.storage, `${VAR}`
    resolved; the one S3 endpoint is exported in the forms Arrow, MLflow and DVC read."""
    try:
        params = read_params(path)
        settings = Settings.render(params)
    except (ParamsError, SettingsError) as err:
        raise fail(str(err)) from None
    os.environ.update(settings.s3_env())
    return replace(params, tracking=replace(params.tracking, uri=settings.tracking_uri),
                   tune=replace(params.tune, storage=settings.optuna_storage))


@contextmanager
def tracking_uri(params: Params) -> Iterator[str | None]:
    """The MLflow URI to use; with `tracking.uri: local`, a server on 127.0.0.1 for the block."""
    uri = params.tracking.uri
    if uri == "none":
        yield None
    elif uri == "local":
        with MlflowServer(root=Path(params.tracking.dir)) as server:
            yield server.uri
    else:
        yield uri


# --fast/--no-fast and --device of the commands that run inference (evaluate, predict)
InferenceFast = Annotated[bool | None, typer.Option(
    "--fast/--no-fast", help="Override evaluate.fast: channels-last inference or the plain "
                             "layout (same results).")]
InferenceDevice = Annotated[str | None, typer.Option(
    help="Override evaluate.device: auto (the GPU when torch sees one), cpu, cuda or cuda:N.")]


def with_inference(params, *, fast: bool | None, device: str | None):
    """`params` with the inference options given on the command line."""
    given = {k: v for k, v in {"fast": fast, "device": device}.items() if v is not None}
    return replace(params, evaluate=replace(params.evaluate, **given)) if given else params
