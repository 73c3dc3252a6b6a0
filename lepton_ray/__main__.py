"""``python -m lepton_ray``: the ``lepton-ray`` command, for where its script is not on the
PATH (a Ray job's entrypoint, say)."""

from lepton_ray.cli import main

main()
