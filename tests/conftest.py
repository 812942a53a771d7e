import os

# Tests run on the CPU with float32 matmuls at full precision, so parity checks against
# float64 NumPy and PyTorch are meaningful.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
