"""Stage 2: synthetic images from a diffusion model hosted on Ray Serve."""
