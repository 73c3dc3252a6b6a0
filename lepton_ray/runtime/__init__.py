"""Where it runs: the local or remote Ray cluster, Ray Jobs, and shared storage."""
