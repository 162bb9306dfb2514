"""Model sources: where the diffusion model's weights come from (see `source.py`)."""
