"""medfeat.export."""
