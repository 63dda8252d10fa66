"""Does a scored batch still look like the normals its model was set on: the drift statistics
(`drift`) and the monitoring run and Prefect event of a batch (`monitor`). Used by flows/scoring.py.
"""
