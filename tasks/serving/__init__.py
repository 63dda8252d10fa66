"""Scoring new images with a registered model: batch scoring of files into a resumable output
folder (`scoring`, with its journal in `journal`), one folder per day and version for scheduled
runs (`run_folders`), results back into the study as DICOM (`dicom_results`), and the contract of a
served REST request (`request`). Used by flows/scoring.py and `mlflow models serve`.
"""
