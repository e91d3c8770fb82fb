"""Evaluation: mIoU, real GFLOPs per image, gate usage and latency; figures; prediction files in
the official tools' formats; prediction on image files.

May import the rooms data and device.
"""
