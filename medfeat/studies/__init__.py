"""Studies: the experiment runner (a YAML grid of cohorts, models, variants and probes)
and the demo, which orchestrate the rooms below end to end.
"""
