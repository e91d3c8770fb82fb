"""The budget search: Ray Tune trials sampled by Optuna, the MO-ASHA scheduler, the shared
budget-free start of the trials.

May import the rooms data, device, tracking, train, evaluate and pareto.
"""
