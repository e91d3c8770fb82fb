"""The device's measured fast paths (channels-last, folded BN, the CUDA-graph machinery).

Torch only, so benchmarks/gpu_bench.py measures the same code on a machine with PyTorch alone.
Imports no other room of platform/.
"""
