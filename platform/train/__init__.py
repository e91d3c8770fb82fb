"""Training: the recipe, the TrainSpec that travels to Ray workers, the checkpoint layout, the
per-worker loop, one training step, and Ray Train.

May import the rooms data, device and tracking.
"""
