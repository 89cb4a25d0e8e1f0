"""The file MLflow logs as the model's code (models-from-code): it names the pyfunc to serve."""
import mlflow

from bin_counter.serving.model import BinCounterModel

mlflow.models.set_model(BinCounterModel())
