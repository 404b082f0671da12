"""Pure math: the solver pool (and, with the probe, indicators and clustering)."""
