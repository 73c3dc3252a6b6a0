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

ARTIFACT_KEY = "lepton_model"


def output_columns(labels) -> list[str]:
    return ["label", "truncated", *(f"prob_{label}" for label in labels)]


def signature(labels):
    """The MLflow signature of a version predicting ``labels``.

    Input: one string column, unnamed (as MLflow's own text pipelines declare it), so a list
    of strings, a Series and a one-column frame all pass. Output: ``label`` (string),
    ``truncated`` (boolean) and ``prob_<label>`` (double) per label.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    kinds = [DataType.string, DataType.boolean, *([DataType.double] * len(labels))]
    outputs = Schema([ColSpec(k, n) for k, n in zip(kinds, output_columns(labels), strict=True)])
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
        from lepton_ray.models import load_model_artifact

        self.model, self.tokenizer, self.meta = load_model_artifact(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from lepton_ray.predict import classify_batched

        answers = classify_batched(self.model, self.tokenizer, self.meta, _texts(model_input))
        rows = [
            {
                "label": a["label"],
                "truncated": a["truncated"],
                **{f"prob_{label}": p for label, p in a["probabilities"].items()},
            }
            for a in answers
        ]
        return pd.DataFrame(rows, columns=output_columns(self.meta.labels))


mlflow.models.set_model(LeptonTextClassifier())
