"""``python -m lepton_ray.cli``: the same as ``lepton-ray`` (and ``python -m lepton_ray``)."""

from lepton_ray.cli import main

main()
