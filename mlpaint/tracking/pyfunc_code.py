"""The code of the registered model (MLflow's models from code): MLflow copies this file into
the logged model and runs it when the model is loaded; setting the model is its whole job.
mlpaint never imports it. The class it names lives in the package, which the model's
requirements pin."""

from mlflow.models import set_model

from mlpaint.tracking.pyfunc import DigitModelPyfunc

set_model(DigitModelPyfunc())
