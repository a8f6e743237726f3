"""Scripts that write data: the shipped TinyData and synthetic VOC-like trees for tests and
benchmarks."""
