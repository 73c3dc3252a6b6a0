"""Ray Serve: the HTTP prediction API over a registered (quantized) model."""
