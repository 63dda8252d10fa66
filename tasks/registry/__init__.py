"""What is kept of a trained DPA and which version serves: MLflow tracking setup (`tracking`),
model URIs (`model_uri`), the pyfunc model logged from code (`mlflow_model`, `pyfunc_model`,
`dpa_model_code`), registration and the paired DeLong promotion gate (`promotion`, `paired_auc`,
`version_scores`), the check of a loaded version's code against this process's (`model_code`), the
ONNX export with its parity check (`onnx_export`), and lineage from a score back to its data (`lineage`). Used by
flows/training.py, flows/scoring.py and flows/cli.py.
"""
