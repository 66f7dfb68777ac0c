"""Phase 5 applications built on the method packages: pruning, training (protection, sparse fine-tuning),
security (bit flips, faults, backdoors) and interpretability. Each knows nothing of profiles, phases or the CLI."""
