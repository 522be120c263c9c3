"""A run: the two passes (samples, then CIR pairs), the stage recipe, pair mining and the writers."""
