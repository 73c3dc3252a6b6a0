"""A replica's model swaps keep one downloaded model on disk: the replaced one's folder goes.

The real replica class (outside Ray Serve: its methods are plain async code), a real MLflow
store with two registered versions of a tiny model.
"""

import asyncio

from lepton_ray.serve import app as module
from lepton_ray.serve import guards
from tests.conftest import mlflow_store, register_tiny


def test_a_second_swap_leaves_one_model_folder(tmp_path, tiny_artifact, monkeypatch):
    store = mlflow_store(tmp_path)
    versions = [register_tiny(store, tiny_artifact, acc) for acc in (0.7, 0.8)]
    # The replica sets the middleware's state of its process; put it back afterwards.
    monkeypatch.setattr(guards._replica, "settings", None)
    monkeypatch.setattr(guards._replica, "metrics", None)
    # The class as written (Serve's ingress wraps it in an ASGI subclass).
    written = module.TextClassifier.func_or_class.__bases__[0]
    replica = written({"tracking_uri": store["uri"], "torch_threads": 1})

    def swap_to(version: str) -> list:
        choice = {"model_uri": f"models:/reg/{version}", "model_name": "reg"}
        asyncio.run(replica.reconfigure({**choice, "model_version": version}))
        return sorted(replica.models_root.iterdir())

    [first] = swap_to(versions[0])
    assert any(first.rglob("config.json")), "the model was not downloaded there"
    [second] = swap_to(versions[1])
    assert second != first and not first.exists()
    assert swap_to(versions[0]) != [second] and not second.exists()
    assert replica.loaded.choice.model_version == versions[0]
    root = replica.models_root
    replica.__del__()
    assert not root.exists()
