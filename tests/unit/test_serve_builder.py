"""Every way to build the Serve application refuses a reachable endpoint without an API key,
and the tracking URI's credentials never travel in the deployment's arguments as text."""

import pytest

from lepton_ray.serve.app import ServeArgs, app_builder, build_app
from lepton_ray.serve.guards import key_digest

MODEL = {"model_uri": "models:/m/1", "model_name": "m", "model_version": "1"}


def test_build_app_refuses_a_non_loopback_host_without_a_key():
    args = ServeArgs(tracking_uri="sqlite:////tmp/x.db", **MODEL)
    with pytest.raises(ValueError, match="on 0.0.0.0, which other machines reach, with no API key"):
        build_app(args, host="0.0.0.0")
    build_app(args, host="127.0.0.1")  # loopback needs none
    keyed = ServeArgs(tracking_uri="sqlite:////tmp/x.db", api_key_sha256=key_digest("k"), **MODEL)
    build_app(keyed, host="0.0.0.0")


def test_app_builder_fails_closed_and_reads_the_digest_from_the_named_variable(monkeypatch):
    """The RayService path: with no Ray connected, Serve's host is unknown, which needs a key.

    The suite's shared Ray may be connected in this process (Serve on loopback there), so
    the test takes this process off it, as a node outside a cluster would be."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ValueError, match="on an unknown host, with no API key"):
        app_builder(ServeArgs(tracking_uri="sqlite:////tmp/x.db", **MODEL))
    args = ServeArgs(tracking_uri="sqlite:////tmp/x.db", api_key_sha256_env="LRT_DIGEST", **MODEL)
    monkeypatch.delenv("LRT_DIGEST", raising=False)
    with pytest.raises(ValueError, match="LRT_DIGEST is not set on this node"):
        app_builder(args)
    monkeypatch.setenv("LRT_DIGEST", key_digest("k").upper() + "\n")
    application = app_builder(args)
    assert application._bound_deployment.init_args[0]["api_key_sha256"] == key_digest("k")
    monkeypatch.setenv("LRT_DIGEST", "not-a-digest")
    with pytest.raises(ValueError, match="api_key_sha256"):
        app_builder(args)


def test_tracking_credentials_are_kept_out_of_the_deployment_arguments_text():
    args = ServeArgs(
        tracking_uri="https://serve-bot:pa55word@mlflow.example.com/x",
        api_key_sha256=key_digest("k"),
        **MODEL,
    )
    assert args.tracking_uri == "https://mlflow.example.com/x"
    application = build_app(args, host="0.0.0.0")
    [init] = application._bound_deployment.init_args
    for shown in (repr(args), str(args.model_dump(mode="json")), repr(init), str(init)):
        assert "pa55word" not in shown and "serve-bot" not in shown, shown
    # The replica still reaches MLflow with them.
    replica = ServeArgs.model_validate(init)
    assert replica.mlflow_uri() == "https://serve-bot:pa55word@mlflow.example.com/x"
    assert ServeArgs(tracking_uri="sqlite:////tmp/x.db").mlflow_uri() == "sqlite:////tmp/x.db"
