"""Everything that talks to MLflow: the Tracker facade, its buffered metric delivery, model
logging, a local `mlflow server`, what every client shares, and the provenance record.

Imports no other room of platform/ (only the shared leaves at its root).
"""
