"""Evaluation: mIoU, real GFLOPs per image, gate usage and latency; latency as a measurement with
its conditions and noise (latency.py, disturbance.py); figures; prediction files in the official
tools' formats; prediction on image files.

May import the rooms data and device.
"""
