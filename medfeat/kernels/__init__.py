"""medfeat.kernels."""
