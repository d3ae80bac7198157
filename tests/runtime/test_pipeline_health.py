"""What probation reads from a real pipeline: idle is serving, shutting down is stopped."""

from __future__ import annotations

import time

import zmq

from runtime.daemon.model_host import PipelineState
from runtime.daemon.pipeline import POLL_S, ModelPipeline
from runtime.engines import open_engine
from tests.cloud_sync.ota_harness import tiny_bundle


def _pipeline(tmp_path) -> tuple[ModelPipeline, zmq.Context, zmq.Socket]:
    bundle = tiny_bundle(tmp_path, "1.0")
    context = zmq.Context()
    replies = context.socket(zmq.PULL)
    replies.bind("inproc://replies")
    pipeline = ModelPipeline(bundle, open_engine(bundle.onnx_path), context,
                             "inproc://replies", deadline_s=1.0)
    return pipeline, context, replies  # the reply socket stays open while it runs


def test_an_idle_pipeline_with_no_clients_is_serving_not_stalled(tmp_path):
    pipeline, context, replies = _pipeline(tmp_path)
    pipeline.start(warm_up_size=None)
    try:
        stall_s = 10 * POLL_S
        time.sleep(3 * stall_s)  # idle for three stall times: no frame, no client
        assert pipeline.state(stall_s) is PipelineState.SERVING
        assert pipeline.healthy(stall_s)
    finally:
        pipeline.stop()
        replies.close()
        context.term()


def test_a_stopped_pipeline_reads_stopped_never_stalled(tmp_path):
    pipeline, context, replies = _pipeline(tmp_path)
    pipeline.start(warm_up_size=None)
    pipeline.stop()
    try:
        # its threads are gone: before the fix this read "not healthy", i.e. a stall
        time.sleep(2 * POLL_S)
        assert pipeline.state(POLL_S) is PipelineState.STOPPED
        assert not pipeline.healthy()
    finally:
        replies.close()
        context.term()
