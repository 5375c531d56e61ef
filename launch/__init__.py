"""Entry points: train.py (Hydra main, run under torchrun), plan.py (planner), convert.py (Hugging Face
checkpoint import/export), and shell wrappers for multi-node torchrun."""
