"""Training pipeline: `python -m training.run CONFIG.yaml`."""
