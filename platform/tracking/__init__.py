"""Everything that talks to MLflow: the Tracker facade, its buffered metric delivery, model
logging and loading (as data, never pickles), a local `mlflow server`, what every client shares,
and the provenance record.

Imports no other room of platform/ (only the shared leaves at its root).

Importing the room turns MLflow's own pickle loading off (`MLFLOW_ALLOW_PICKLE_DESERIALIZATION`,
read by MLflow at each load) in this process and the processes it starts: dynroute never loads a
pickled model (docs/platform.md, "Models are data").
"""

import os

os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
