"""Trainium (trn1) support that is not part of the model: the environment check (``environment``, standard library
only) and the fixed-shape prefill/decode graphs for ``torch_neuronx.trace`` (``inference_graphs``).

The job material that uses them (launchers, ``env.sh``, the export command) lives in ``neuron/``. Nothing here imports
a Neuron package at import time.
"""
