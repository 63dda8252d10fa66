"""The paper's few-anomaly hyperparameter search (docs/method.md §6) as plain functions and Prefect tasks.

One module per job, in the order the search uses them (flows/tuning.py runs it top to bottom):

- `space`: the search space (ladder rung × VGG layers × progressive growing) and each point's config;
- `data`: the train/val view the search may see, its group-disjoint folds and validation anomalies;
- `trial`: one trial, trained on every fold with early stopping, as an MLflow child run (`run_trial`);
- `study`: the Optuna study on a database, its grid sampler, requeue on restart and recorded results;
- `plan`: how many trials, and the progress line; `runner`: the trials in flight, stopped safely on a signal;
- `results`: leaderboard, AUROC plot, best config, the parent MLflow run and publishing.
"""
