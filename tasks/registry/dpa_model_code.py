"""The models-from-code file of the DPA pyfunc (MLflow 3 "models from code").

`log_dpa_model` logs this file instead of a pickled Python object: loading a version imports the
project code logged with it (`code/`) and runs these lines, so no code is unpickled. Weights,
serving config and reference scores come from the model's artifacts in `load_context`.
"""

import mlflow

from tasks.registry.pyfunc_model import DPAPyfuncModel

mlflow.models.set_model(DPAPyfuncModel())
