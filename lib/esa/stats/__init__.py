"""Statistics: stability of top-k sets, heavy tails, inference for perturbation experiments."""
