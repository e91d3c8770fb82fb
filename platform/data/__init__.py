"""Data: Parquet shards (local or s3://), the streaming torch dataset, augmentation.

Imports no other room of platform/ (only the shared leaves at its root, and models/).
"""
