"""params.yaml's schema, assembled from the rooms' own dataclasses, and every endpoint rendered
from params and the environment.

May import every other room; none imports it.
"""
