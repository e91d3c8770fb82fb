"""Pipelines: the `dynroute` command and the DVC stages it runs."""
