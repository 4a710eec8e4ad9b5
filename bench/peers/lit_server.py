"""LitServe server for ``bench.peers``: the service's own decoding, preset and model.

    python -m bench.peers.lit_server --models-dir DIR --model-id ID --port 8771 --workers 2 \\
        [--max-batch-size 4 --batch-timeout 0.01]

POST /predict with the multipart field ``file``; answers ``{"predictions": [...]}`` (top 5). Stops
cleanly on SIGINT.
"""

from __future__ import annotations

import argparse

import litserve as ls

from bench.peers.common import classify_batch, decode, load_model


class ImgclfAPI(ls.LitAPI):
    def __init__(self, models_dir: str, model_id: str, threads: int, **kwargs):
        super().__init__(**kwargs)
        self.models_dir, self.model_id, self.threads = models_dir, model_id, threads

    def setup(self, device):
        self.loaded = load_model(self.models_dir, self.model_id, self.threads)

    def decode_request(self, request):
        upload = request["file"]
        data = upload.file.read() if hasattr(upload, "file") else upload
        return decode(self.loaded, data)

    def batch(self, inputs):
        return inputs

    def predict(self, x):
        if isinstance(x, list):  # a batch (max_batch_size > 1)
            return classify_batch(self.loaded, x)
        return classify_batch(self.loaded, [x])[0]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-dir", required=True)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2, help="inference worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-timeout", type=float, default=0.0, help="seconds")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args()
    api = ImgclfAPI(
        args.models_dir,
        args.model_id,
        args.threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
    )
    server = ls.LitServer(api, accelerator=args.accelerator, workers_per_device=args.workers, timeout=60)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
