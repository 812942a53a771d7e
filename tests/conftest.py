import os

# Tests run on the CPU with float32 matmuls at full precision, so parity checks against
# float64 NumPy and PyTorch are meaningful.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# JAX's CPU svd/eigh and NumPy use OpenBLAS; its default threads fight XLA's for the cores (measured 6-8x
# slower SVDs under load), so tests use one BLAS thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
