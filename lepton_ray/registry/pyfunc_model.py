"""The MLflow pyfunc of a registered lepton-ray model ("models from code": nothing pickled).

MLflow copies this file into every registered version and runs it when the version is
loaded; the lepton-ray package travels in the version's ``code/`` folder and the model
artifact (safetensors weights, tokenizer, ``lepton_model.json``) in ``artifacts/``. So

    mlflow.pyfunc.load_model("models:/NAME@champion").predict(["a raw text", ...])

works with MLflow's own tools and no lepton-ray code of the reader's. Input: a list of
strings, a pandas Series, or a DataFrame whose first column holds the texts. Output: a
DataFrame with ``label``, ``truncated`` and one ``prob_<label>`` column per label. Every
version records both as its MLflow signature (:func:`signature`), which MLflow's UI shows and
``mlflow.pyfunc`` / ``mlflow models serve`` enforce on the input.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

from lepton_ray.artifacts import ARTIFACT_KEY


def signature(task: str, labels):
    """The MLflow signature of a version of ``task`` predicting ``labels``.

    Input: one string column, unnamed (as MLflow's own text pipelines declare it), so a list
    of strings, a Series and a one-column frame all pass. Output: the task's prediction
    table (a classifier: ``label`` (string), ``truncated`` (boolean) and ``prob_<label>``
    (double) per label).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    from lepton_ray.tasks import get_task

    columns = get_task(task).prediction_schema(labels)
    outputs = Schema([ColSpec(getattr(DataType, kind), name) for name, kind in columns])
    return ModelSignature(inputs=Schema([ColSpec(DataType.string)]), outputs=outputs)


def _texts(model_input) -> list[str]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise ValueError(f"texts must be strings; item {bad[0]} is {type(values[bad[0]]).__name__}")
    return values


class LeptonTextClassifier(PythonModel):
    def load_context(self, context) -> None:
        from lepton_ray.compress.formats import load_model_artifact
        from lepton_ray.tasks import get_task

        self.model, self.tokenizer, self.meta = load_model_artifact(context.artifacts[ARTIFACT_KEY])
        self.task = get_task(self.meta.task)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        answers = self.task.predict_batched(
            self.model, self.tokenizer, self.meta, _texts(model_input)
        )
        columns = [name for name, _ in self.task.prediction_schema(self.meta.labels)]
        return pd.DataFrame([self.task.prediction_row(a) for a in answers], columns=columns)


mlflow.models.set_model(LeptonTextClassifier())
