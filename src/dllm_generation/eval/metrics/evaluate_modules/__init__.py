"""Metric scripts for ``evaluate.load(<local path>)``; see ``metrics.evaluate_loading``.

Each folder holds one script named after it, as ``evaluate`` requires. The
folders are packages only so that wheels ship the scripts.
"""
