"""From a data source to a trained, evaluated DPA: import and version the data (`data`), the
Great Expectations gate (`validation`), decoding (`preprocessing`), training in process or through
torchrun (`train`, `distributed_training`), several seeds (`seeds`), and the evaluation with its
metrics, pixel baselines and model card (`evaluation`, `metrics`, `baseline_evaluation`,
`evaluation_report`). Used by flows/training.py, and by the benchmark and tuning flows.
"""
