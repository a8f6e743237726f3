"""Training: the experiment (set_up -> fit -> finish), what it builds, one epoch, the training
state and its checkpoints, early stopping, the dataset contract and a finished run's outputs."""
