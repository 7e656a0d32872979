"""Training stages, each runnable as `python -m training.<stage>` or under `torchrun`."""
