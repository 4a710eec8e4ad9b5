"""Side-by-side serving benchmark: this API, TorchServe and LitServe (run ``python -m bench.peers``)."""
