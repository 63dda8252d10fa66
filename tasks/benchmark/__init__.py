"""The paper's table, reproduced: which presets and datasets (`data`), one preset × seed cell as
an MLflow run (`cells`), and the aggregated table (`table`). Used by flows/benchmark.py.
"""
