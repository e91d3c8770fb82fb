"""Pure Pareto functions (sort, hypervolume, knee, budget buckets) and their figures.

Imports no other room of platform/.
"""
