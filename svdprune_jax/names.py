"""Method names: the one list every other list of methods derives from. Plain names and no JAX, so that the
command line's --help can list them without loading JAX."""
METHODS = ("svd", "random", "norm", "cls_attention", "divprune", "visionzip", "lrcp")  # selectors before the LLM
FULL = "full"  # no pruning
FASTV = "fastv"  # pruning inside the language model (models/llama.py's hook)
ANSWER_METHODS = (FULL, *METHODS, FASTV)  # what `Pipeline.answer` and `svdprune-jax run --method` take
