"""The paper's table, reproduced: which presets and datasets (`data`), one preset × seed cell as
an MLflow run (`cells`) under the parent run (`parent`), and the aggregated table (`table`). Used by
flows/benchmark.py.
"""
