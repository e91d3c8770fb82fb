"""The Pareto-aware MLflow registry: pareto.json checked and its aliases chosen (pure), versions,
tags and aliases written to MLflow and read back, measured latency per device on the versions,
"the best model under N GFLOPs" or "under 20 ms at p90 on this machine".

May import the rooms tracking and pareto.
"""
