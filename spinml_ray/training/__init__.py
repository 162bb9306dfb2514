"""Stage 3: the user's specialized model, trained on synthetic data only."""
