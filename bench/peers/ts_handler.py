"""TorchServe handler for ``bench.peers``: the service's own decoding, preset and model.

Packed into a .mar with ``peer.json`` ({"root": repository, "models_dir", "model_id", "threads"})
as an extra file. TorchServe batches up to the model's ``batch_size`` requests (within
``max_batch_delay``) into one ``handle`` call; the multipart field ``data`` holds the image.
"""

import json
import os
import sys


class ImgclfHandler:
    """One per TorchServe Python worker (the only class of this module: TorchServe's entry point)."""

    def __init__(self):
        self.loaded = None
        self.initialized = False

    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, "peer.json")) as f:
            config = json.load(f)
        sys.path.insert(0, config["root"])
        from bench.peers.common import load_model

        self.loaded = load_model(config["models_dir"], config["model_id"], config["threads"])
        self.initialized = True

    def handle(self, data, context):
        from bench.peers.common import classify_batch, decode

        items = []
        for row in data:
            body = row.get("data") or row.get("file") or row.get("body")
            items.append(decode(self.loaded, bytes(body)))
        return classify_batch(self.loaded, items)
