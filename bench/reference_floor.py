"""The reference floor: the least a ZeroMQ frame server can do per frame, in one thread.

A measuring stick for `sightline bench`, not product: one ROUTER socket, and for each
frame decode -> preprocess -> engine -> output decode -> encode reply -> send, all in the
thread that owns the socket, with no pipeline threads, no newest-frame slots, no limits.
It uses the daemon's own decoder, preprocessor, engine and task decoder, and stamps its
replies like the daemon, so the difference between the two is the daemon's machinery.

    python bench/reference_floor.py BUNDLE_DIR ipc:///tmp/floor.sock [--threads N]
"""

from __future__ import annotations

import argparse
import signal
import time

import zmq

from runtime.daemon.inference import LoadedModel, decode_frame, frame_feeds
from runtime.engines import EngineSettings
from runtime.errors import ProtocolError
from runtime.fusion.open import open_serving_engine
from runtime.models.bundle import Bundle
from runtime.protocol import FrameHeader, encode_error, encode_pong, encode_result, parse_header


def serve(bundle: Bundle, endpoint: str, settings: EngineSettings) -> None:
    model = LoadedModel.of(bundle, open_serving_engine(bundle, settings))
    model.warm_up()
    info = [{"name": bundle.name, "version": bundle.version, "task": bundle.manifest.task,
             "precision": bundle.manifest.precision, "provider": model.engine.provider,
             "labels": list(bundle.manifest.labels), "default": True}]
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    print("floor ready", flush=True)
    while running[0]:
        if not router.poll(100):
            continue
        parts = router.recv_multipart(copy=False)
        received = time.time()
        client = parts[0].bytes
        try:
            header = parse_header(parts[1].buffer)
            if not isinstance(header, FrameHeader):
                router.send_multipart([client, encode_pong(header.seq, info)])
                continue
            image, color = decode_frame(model, header, parts[2].buffer)
            decoded = time.time()
            feeds, transform = frame_feeds(model, header, image, color)
            stamps = {"received": received, "taken": received, "decoded": decoded,
                      "preprocessed": time.time()}
            stamps["started"] = time.time()
            outputs = model.engine.infer(feeds)
            stamps["inferred"] = time.time()
            result = model.frames.decode(outputs, transform)
            stamps["postprocessed"] = time.time()
            reply = encode_result(header, bundle.name, bundle.version, result, stamps, 0)
        except ProtocolError as exc:
            reply = encode_error(None, exc.code, exc.message)
        router.send_multipart([client, reply])
    router.close()
    model.engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("endpoint")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    parser.add_argument("--fused", choices=("auto", "off"), default="auto",
                        help="engine.fused, as the daemon it is compared with")
    args = parser.parse_args()
    serve(Bundle.load(args.bundle), args.endpoint,
          EngineSettings(intra_op_threads=args.threads, fused=args.fused))


if __name__ == "__main__":
    main()
