"""The demo: train, compare and time a multi-exit model on the bundled digits (`timm-exits demo`)."""
from .run import early_exit_tradeoff, evaluate, fit, load_digits_32, narrower, run_demo
