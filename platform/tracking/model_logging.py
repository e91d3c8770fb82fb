"""Logging and loading PyTorch models with MLflow: the model half of the facade.

`Tracker.log_model` (in `tracker.py`) calls `log_pytorch_model` with the tracker's run, experiment
and URI; `load_pytorch_model` serves code that only reads a model back (e.g. the `dynroute`
pipelines); `registry/register.py` registers the logged models. The rest of the facade logs through
`MlflowClient` with explicit run ids; model logging needs MLflow's fluent API, which reads
process-wide URIs (set by `use_fluent_uris` first), and the facade's fluent calls live here. Like
`tracker.py`, it is one of the few modules that import `mlflow` (docs/conventions.md, lesson 8).

MLflow 3.17 facts this module relies on (checked in the installed source):

* `mlflow.pytorch.log_model` takes `name=` (`artifact_path=` is deprecated), returns a `ModelInfo`
  whose `model_uri` is `models:/<model_id>` (a LoggedModel, no longer `runs:/...`), and defaults to
  `serialization_format="pt2"` (torch.export; needs `input_example`) outside Databricks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlflow
import mlflow.pytorch
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

if TYPE_CHECKING:
    import numpy as np

__all__ = ["load_pytorch_model", "log_pytorch_model", "use_fluent_uris"]


def use_fluent_uris(uri: str) -> None:
    """Point MLflow's fluent API (process-wide) at `uri` for both tracking and the registry."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


def log_pytorch_model(model: torch.nn.Module, *, tracking_uri: str, experiment_id: str,
                      run_id: str, name: str, input_example: np.ndarray,
                      output_example: np.ndarray | None = None,
                      pip_requirements: list[str] | None = None) -> str:
    """Log a PyTorch model to run `run_id`, with a signature inferred from the examples.

    Pickle serialization with explicit requirements takes ~1 s; MLflow 3's default (pt2 via
    torch.export, requirements inferred in a subprocess) needs an input example and ~20 s.
    The model's classes must be importable where it is loaded (pickled by reference).

    Args:
        model: the module; it must map one tensor to one tensor for `pyfunc` serving.
        tracking_uri: the server holding the run.
        experiment_id: the run's experiment, where the logged model is put beside its run.
        run_id: the run to log to.
        name: the model's name within the run.
        input_example: a batch like the model's input, e.g. (B, 3, H, W) float32.
        output_example: the model's output for it; None runs the model (in eval mode, no
            grad) to get it.
        pip_requirements: the serving environment; default torch and cloudpickle pinned to
            the installed versions. Add the wheel holding the model's code.

    Returns:
        The model URI, `models:/<model_id>`.
    """
    if output_example is None:
        output_example = _predict(model, input_example)
    signature = infer_signature(input_example, output_example)
    if pip_requirements is None:
        pip_requirements = mlflow.pytorch.get_default_pip_requirements()
    use_fluent_uris(tracking_uri)
    # A logged model lands in the fluent API's current experiment, not in its run's: point
    # it at the run's experiment so the model sits beside its run.
    mlflow.set_experiment(experiment_id=experiment_id)
    # `run_id` reaches `Model.log` through log_model's **kwargs (checked in 3.17): the fluent
    # active run is thread-local and the facade does not use it.
    info = mlflow.pytorch.log_model(model, name=name, signature=signature,
                                    serialization_format="pickle",
                                    pip_requirements=pip_requirements, run_id=run_id)
    return info.model_uri


def load_pytorch_model(model_uri: str, *, tracking_uri: str | None) -> torch.nn.Module:
    """A logged or registered PyTorch model (`models:/NAME@ALIAS`, `models:/<id>`, `runs:/…`)."""
    if tracking_uri is not None:
        use_fluent_uris(tracking_uri)
    try:
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except MlflowException as err:
        raise ValueError(f"cannot load model {model_uri} from {tracking_uri}: {err}") from None


def _predict(model: torch.nn.Module, example: np.ndarray) -> np.ndarray:
    """Run `model` on `example` in eval mode without grad, on the model's device; as numpy."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.as_tensor(example, device=device))
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"{type(model).__name__} returned {type(output).__name__}, not a tensor; "
                        "pass output_example= explicitly (or log a wrapper returning a tensor)")
    return output.detach().cpu().numpy()
