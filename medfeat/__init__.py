"""medfeat: foundation-model features and linear probes for medical imaging cohorts."""

__version__ = "0.1.0"
