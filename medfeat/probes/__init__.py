"""medfeat.probes."""
