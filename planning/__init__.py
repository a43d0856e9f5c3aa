"""The self-configuring part: dataset fingerprint and experiment planner.

Pure functions over numpy arrays and JSON-able dicts; importable without torch.
"""
