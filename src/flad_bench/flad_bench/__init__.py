"""FLAD's benchmarks (`flad bench NAME`): harnesses over the product packages, kept out of them.

flad_bench sits above every layer (flad_bench -> flad_edge -> flad_vehicle -> flad_sim -> flad_core) and
is installed by pip only; no product module imports it.
"""
