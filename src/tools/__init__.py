"""Tools that read runs and measure the data path, apart from the training core:
`reproduce`, `compare_runs`, `benchmark_loader`, `tutorial_differences`."""
