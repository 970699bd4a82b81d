"""Benchmarks of mlmamba's kernels and models against PyTorch: `python -m bench`."""
