"""Fine-tuning: a pure-torch loop, its Ray Train worker wrapper, and the driver."""
