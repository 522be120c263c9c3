"""Tools over a finished output: refilter, export, card, inspect, plan, and the run reader they share."""
