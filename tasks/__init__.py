"""Prefect tasks and the plain functions behind them: they adapt `model/` and `data_layer/` to
Prefect and MLflow; `flows/` composes them. One subpackage per concern:

- `training`: data, validation gate, preprocessing, training (one process or torchrun), seeds, evaluation;
- `registry`: MLflow tracking, the logged pyfunc model, registration and the paired promotion gate, lineage;
- `serving`: batch scoring of files, the REST request contract, the score journal;
- `monitoring`: score drift of a scored batch and the Prefect event it sends;
- `benchmark`: the preset × seed benchmark cells and their table;
- `tuning`: the few-anomaly hyperparameter search;
- `runtime`: the local stack (`dpa up/down`), server processes, signals, task runners.

Shared by all: `config` (the run configuration) and `paths` (checkout and project directories).
"""
