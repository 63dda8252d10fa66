"""Scoring new images with a registered model: batch scoring of files into a resumable output
folder (`scoring`, with its journal in `journal`) and the contract of a served REST request
(`request`). Used by flows/scoring.py and `mlflow models serve`.
"""
