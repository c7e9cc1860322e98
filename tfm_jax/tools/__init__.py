"""Commands on runs: convert, quantize, calibrate, inspect, export, the Python API's Run, the
lm-evaluation-harness adapter."""
