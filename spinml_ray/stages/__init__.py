"""The Ray layer: each stage wires pure functions into Ray Data, Ray Serve or Ray Train."""
