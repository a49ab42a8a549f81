"""The models-from-code file of the logged PEP model (see `pipeline.tracking.log_pep_model`).

MLflow copies this file into the model directory and runs it on `mlflow.pyfunc.load_model`:
it names the wrapper class, so loading unpickles no Python object; the weights come from the
model's `checkpoint` artifact, read with `torch.load(..., weights_only=True)`. The model's
`code/` folder (pep_model, pipeline) is on `sys.path` by then. Run by MLflow, not imported.
"""

import mlflow

from pipeline.tracking import PEPPyfunc

mlflow.models.set_model(PEPPyfunc())
