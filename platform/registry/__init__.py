"""The Pareto-aware MLflow registry: pareto.json checked and its aliases chosen (pure), versions,
tags and aliases written to MLflow and read back, "the best model under N GFLOPs".

May import the rooms tracking and pareto.
"""
