"""The model file of the pipeline's MLflow model (models-from-code).

`src.registry.log_pyfunc_model` passes this file BY PATH to `mlflow.pyfunc.log_model`; MLflow
stores it with the model and runs it when the model is loaded, so nothing is unpickled. Never
import it: it exists to be run by MLflow.
"""

import mlflow

from src.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
