"""The model layer (torch): model config and presets, vision tower, integrators, the LLaMA wrapper,
checkpoint I/O, official MobileVLM import, the manifest summary and the torch backend.

It imports only ``edgevlm.runtime`` below it; training, export and benchmarks build on it
(``tests/test_layers.py`` checks the direction).
"""
