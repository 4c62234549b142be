"""medfeat.engine."""
