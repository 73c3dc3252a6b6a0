"""lepton-ray: fine-tuning experiments on Ray, from a dataset to a served model."""

__version__ = "0.1.0"
