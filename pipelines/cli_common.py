"""What every `dynroute` command handler shares: the error exit, the params file with the
environment's overrides, the MLflow server a command uses, and the --fast/--no-fast switch of the
inference commands. `CommandGroup` is the app's top level: stop signals, operating-system and
service failures, `--debug`."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import click
import typer
from typer.core import TyperGroup

from dynroute.platform.config.params import Params, ParamsError
from dynroute.platform.config.params import load_params as read_params
from dynroute.platform.config.settings import Settings
from dynroute.platform.tracking.server import MlflowServer, MlflowServerError
from dynroute.platform.url_secrets import SettingsError, mask_secrets

# What the top level knows about this command: `--debug` (or DYNROUTE_DEBUG=1) and the line that
# says how to continue when it is interrupted (`on_interrupt`).
_command: dict[str, Any] = {"debug": False, "resume": "run the same command again",
                            "signal": None}


def fail(message: str) -> typer.Exit:
    """Print `message` as an error, any password in a URL it quotes masked, and give the exit
    to raise (status 1). With --debug, the traceback of the exception being handled comes
    first."""
    if _command["debug"] and sys.exc_info()[1] is not None:
        typer.echo(mask_secrets(_printable(traceback.format_exc())), err=True, nl=False)
    typer.echo(f"error: {_printable(mask_secrets(message))}", err=True)
    return typer.Exit(1)


def _printable(text: str) -> str:
    # A file name that is not UTF-8 reaches Python as surrogate escapes, which the console's
    # encoder refuses (UnicodeEncodeError); show its bytes as \xNN instead.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def on_interrupt(resume: str) -> None:
    """What the line printed on Ctrl-C (SIGINT), SIGTERM or SIGHUP says after where the command
    stopped: how to continue, e.g. "run the same command again: it continues from …"."""
    _command["resume"] = resume


# -- stop signals ------------------------------------------------------------------------------
# SIGTERM (kill, timeout, docker stop, batch schedulers) and SIGHUP (a closed terminal) are
# handled as Ctrl-C is: they raise KeyboardInterrupt in the main thread, so every `finally` and
# `except KeyboardInterrupt` on the way out runs (the managed MLflow server stops, the MLflow run
# ends KILLED, temporary folders go) and the exit status is 128 + the signal's number.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_owner: dict[str, Any] = {"pid": None, "signals": (), "signal": signal.signal}


class Interrupted(KeyboardInterrupt):
    """A stop signal, raised as Ctrl-C's exception; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_stop_signal(signum: int, frame: object) -> None:
    if os.getpid() != _owner["pid"]:  # a forked child (prepare's decoders): die as by default
        _owner["signal"](signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _command["signal"] = signum  # Ray's ray.get raises a KeyboardInterrupt of its own for it
    raise Interrupted(signum)


def _keep_stop_handlers(signalnum, handler):
    """signal.signal while the command runs: the stop signals keep our handler.

    Libraries the commands drive install their own, which break the rule above: `ray.init` makes
    SIGTERM `sys.exit(15)` (exit status 15; a search's parent run ended FAILED), Ray Train makes
    SIGINT abort its controller and `sys.exit(0)` (an interrupted training exited 0), and Ray Tune
    makes SIGINT end the search and return normally (it was written up as finished, with advice
    to resume through `Tuner.restore`). Resuming is ours: the checkpoints and the Optuna study.
    See docs/platform.md, pitfall 12.
    """
    if signalnum in _owner["signals"] and os.getpid() == _owner["pid"]:
        return _on_stop_signal
    return _owner["signal"](signalnum, handler)


@contextmanager
def stop_signals_as_interrupts() -> Iterator[None]:
    """In the block, SIGINT, SIGTERM and SIGHUP raise `Interrupted` in this process (the
    handlers before it come back after it: a test may invoke the app in its own process)."""
    if _owner["pid"] is not None or threading.current_thread() is not threading.main_thread():
        yield  # already in place (a command inside a command), or signals are not ours to set
        return
    # A signal ignored from the start stays ignored: `nohup` ignores SIGHUP, a shell ignores
    # SIGINT in a background job.
    before = {signum: handler for signum in STOP_SIGNALS
              if (handler := signal.getsignal(signum)) is not signal.SIG_IGN}
    _owner["pid"], _owner["signals"] = os.getpid(), tuple(before)
    for signum in before:
        _owner["signal"](signum, _on_stop_signal)
    signal.signal = _keep_stop_handlers
    try:
        yield
    finally:
        signal.signal = _owner["signal"]
        _owner["pid"], _owner["signals"] = None, ()
        for signum, handler in before.items():
            signal.signal(signum, handler)


# -- the top level -----------------------------------------------------------------------------
_OS_REMEDIES = {
    errno.ENOSPC: "the disk is full: free space there or choose a folder on another disk",
    errno.EDQUOT: "your disk quota is used up: free space in it or choose another disk",
    errno.EROFS: "the filesystem is read-only: remount it writable or choose another folder",
    errno.EACCES: "permission denied: fix the permissions or choose another folder",
    errno.EPERM: "operation not permitted: fix the permissions or choose another folder",
    errno.ELOOP: "a symbolic link loop: point the link at a real file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "it exists and is not a folder: choose another path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EISDIR: "it is a folder, not a file: give a file",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.EIO: "an input/output error: check the disk",
}


def os_error_message(err: OSError) -> str:
    """One line for an operating-system failure: the path (or endpoint), what failed and what
    to do."""
    remedy = _OS_REMEDIES.get(err.errno)  # type: ignore[arg-type]
    if err.filename is None:  # requests, pyarrow, sockets: the path is in the message
        return f"{err}; {remedy}" if remedy else str(err)
    where = os.fsdecode(err.filename)
    if err.filename2 is not None:
        where += f" → {os.fsdecode(err.filename2)}"
    return f"{where}: {remedy or err.strerror}"


_API_URL = re.compile(r"API request to (\S+) failed with exception")
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^\"')(]+)")


def service_message(err: Exception) -> str | None:
    """One line for a failure of a service a command talks to (MLflow, its managed server), or
    None when `err` is not one."""
    if isinstance(err, MlflowServerError):
        return str(err)
    if "mlflow" not in sys.modules:  # an MLflow error needs MLflow loaded; no import for a check
        return None
    # Lazy, as the handlers' stages (cli.py says why); only loaded when MLflow is.
    from dynroute.platform.registry.register import SERVICE_ERRORS

    if not isinstance(err, SERVICE_ERRORS):
        return None
    text = str(err)
    url = _API_URL.search(text)
    if url and ("Max retries exceeded" in text or "Connection" in text):
        server = urlsplit(url.group(1))
        reason = _ERRNO_TEXT.search(text)
        because = f" ({reason.group(1).strip().lower()})" if reason else ""
        return (f"cannot reach the MLflow tracking server at {server.scheme}://{server.netloc}"
                f"{because}: start it, or set tracking.uri in the params file (or "
                f"MLFLOW_TRACKING_URI) to a server that is up; `dynroute settings` shows which "
                f"one this command used")
    return text


_COMMAND_PATH = "dynroute.command_path"  # the command that runs, e.g. "dynroute data prepare"


class CommandGroup(TyperGroup):
    """The `dynroute` app's top level, around every command: stop signals as Ctrl-C with the
    conventional exit status (130, 143, 129) and one line on how to continue; operating-system
    and service failures as one `error:` line (exit 1), their traceback only with --debug."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        for arg in args if parent is None else ():
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:  # bytes the locale could not decode, kept as surrogates
                raise fail(f"{_printable(arg)} is not UTF-8: rename it (or pass another path); "
                           f"shards, manifests and MLflow store names as UTF-8") from None
        return super().make_context(info_name, args, parent=parent, **extra)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta[_COMMAND_PATH] = f"{ctx.command_path} {name}"  # meta is shared with subcommands
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with stop_signals_as_interrupts():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt as stop:
            signum = stop.signum if isinstance(stop, Interrupted) else (
                _command["signal"] or signal.SIGINT)
            command = ctx.meta.get(_COMMAND_PATH, ctx.command_path)
            typer.echo(f"interrupted by {signal.Signals(signum).name} during `{command}`: "
                       f"{_printable(mask_secrets(_command['resume']))}", err=True)
            _end_ray_then_exit(128 + signum)
            raise typer.Exit(128 + signum) from None
        except OSError as err:
            if _command["debug"]:
                raise
            raise fail(os_error_message(err)) from None
        except Exception as err:
            message = service_message(err)
            if message is None or _command["debug"]:
                raise
            raise fail(message) from None


def _end_ray_then_exit(status: int) -> None:
    """With a Ray driver in this process: exit at once with `status`.

    An interrupted Ray driver dies by SIGABRT (exit status 134, not 143) in `ray.shutdown()` or
    in the interpreter's teardown, whose C++ destructors run under Ray's leftover threads (as
    tests/conftest.py records for test processes). Everything of ours is cleaned up by now, and
    the processes of a local Ray cluster share the driver's fate: they end with it."""
    if "ray" not in sys.modules:
        return
    import ray  # loaded already (see the "if" above)

    if not ray.is_initialized():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def set_debug(debug: bool) -> None:
    """--debug / DYNROUTE_DEBUG=1: show the traceback behind an error."""
    _command["debug"] = debug


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
