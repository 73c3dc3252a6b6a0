"""The MLflow pyfunc of a registered lepton-ray model ("models from code": nothing pickled).

MLflow copies this file into every registered version and runs it when the version is
loaded; the lepton-ray package travels in the version's ``code/`` folder and the model
artifact (safetensors weights, tokenizer, ``lepton_model.json``) in ``artifacts/``. So

    mlflow.pyfunc.load_model("models:/NAME@champion").predict(["a raw text", ...])

works with MLflow's own tools and no lepton-ray code of the reader's. What goes in and
comes out is the task's (``Task.pyfunc_predict``): a classifier takes a list of strings, a
Series, or a DataFrame whose first column holds the texts, and returns ``label``,
``truncated`` and one ``prob_<label>`` column per label; a language model takes a DataFrame
of ``prompt`` strings or ``messages`` lists (and the parameter ``max_new_tokens``) and
returns the generated ``text``. Every version records both as its MLflow signature
(:func:`signature`), which MLflow's UI shows and ``mlflow.pyfunc`` enforces on the input.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

from lepton_ray.artifacts import ARTIFACT_KEY


def signature(task: str, labels):
    """The MLflow signature of a version of ``task`` predicting ``labels``: the task's input
    columns, prediction table and parameters (``Task.pyfunc_signature``). A classifier takes
    one string column, unnamed (as MLflow's own text pipelines declare it), so a list of
    strings, a Series and a one-column frame all pass; it returns ``label``, ``truncated``
    and ``prob_<label>`` per label. A language model takes prompts or message lists and
    ``max_new_tokens``, and returns the generated text."""
    from lepton_ray.tasks import get_task

    return get_task(task).pyfunc_signature(labels)


class LeptonModel(PythonModel):
    def load_context(self, context) -> None:
        from lepton_ray.compress.formats import load_model_artifact
        from lepton_ray.tasks import get_task

        self.model, self.tokenizer, self.meta = load_model_artifact(context.artifacts[ARTIFACT_KEY])
        self.task = get_task(self.meta.task)

    def predict(self, context, model_input, params=None):
        return self.task.pyfunc_predict(
            self.model, self.tokenizer, self.meta, model_input, params or {}
        )


mlflow.models.set_model(LeptonModel())
