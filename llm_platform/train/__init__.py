"""The training stage: launcher (Ray Train) -> loop (per worker) with parallelize, checkpoint, optim, metrics."""
