"""What measures the repository: training step, loader, sweep, the tutorial's differences."""
