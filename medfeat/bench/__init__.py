"""The ``medfeat bench`` harness: timings, machine ceilings, benchmark stages against
their peers, the pipeline-efficiency study and cohort planning.
"""
