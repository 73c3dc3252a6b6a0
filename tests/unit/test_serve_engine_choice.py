"""``serve.engine``: which engine serves a language model, and the refusals of vLLM where it
cannot run or would run without the API key the config asks for (fail closed)."""

from __future__ import annotations

import pytest

from lepton_ray.errors import LeptonError
from lepton_ray.serve import vllm_app
from lepton_ray.serve.vllm_app import choose_engine


@pytest.mark.parametrize("installed", [True, False])
def test_hf_is_always_hf_and_auto_takes_vllm_only_with_vllm_and_a_gpu(monkeypatch, installed):
    monkeypatch.setattr(vllm_app, "vllm_installed", lambda: installed)
    assert choose_engine("hf", 4, has_key=False) == "hf"
    assert choose_engine("auto", 0, has_key=False) == "hf"
    assert choose_engine("auto", 1, has_key=False) == ("vllm" if installed else "hf")


def test_vllm_is_refused_where_it_cannot_run_or_would_skip_the_key(monkeypatch):
    monkeypatch.setattr(vllm_app, "vllm_installed", lambda: False)
    with pytest.raises(LeptonError, match="not installed"):
        choose_engine("vllm", 1, has_key=False)
    monkeypatch.setattr(vllm_app, "vllm_installed", lambda: True)
    with pytest.raises(LeptonError, match="no GPU"):
        choose_engine("vllm", 0, has_key=False)
    with pytest.raises(LeptonError, match="API keys"):
        choose_engine("vllm", 1, has_key=True)
    assert choose_engine("auto", 1, has_key=True) == "hf"  # the key is checked, by our app
    assert choose_engine("vllm", 1, has_key=False) == "vllm"


def test_vllm_is_really_absent_here_so_auto_serves_with_our_engine():
    # This machine's truth, not a patched one: the CPU engine serves here.
    assert not vllm_app.vllm_installed()
    assert choose_engine("auto", 0, has_key=True) == "hf"
