"""`sightline demo`: the whole path on one machine, with output a person can look at.

Starts a daemon in this process, streams a real image sequence through it with the
client SDK at the source's frame rate, draws the overlays that come back, and prints a
latency table. The default sequence pans and zooms over a real photograph.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from runtime.client import Client, Reply
from runtime.config import SecuritySettings, ServeConfig, ServerSettings
from runtime.errors import SightlineError
from runtime.latency import latency_table, stage_durations_ms
from runtime.model_zoo import ASTRONAUT_PNG, fetch_asset, resolve_bundle
from runtime.overlay import draw_detections
from runtime.security import throwaway_keys
from runtime.server import Server

FRAME_SIZE = (640, 480)


def astronaut_sequence(count: int, size: tuple[int, int] = FRAME_SIZE) -> Iterator[np.ndarray]:
    """A smooth pan-and-zoom over scikit-image's astronaut photograph (a real face)."""
    photo = cv2.imread(str(fetch_asset(ASTRONAUT_PNG)))
    if photo is None:
        raise SightlineError("the cached astronaut image is unreadable; delete it and retry")
    width, height = size
    for i in range(count):
        phase = i / max(1, count - 1)
        zoom = 1.0 + 0.6 * np.sin(np.pi * phase)  # in, then out again
        view_w = photo.shape[1] / zoom  # the photo region this frame shows, 4:3
        center_x = 256 + 40 * np.sin(2 * np.pi * phase)
        center_y = 200 + 25 * np.cos(2 * np.pi * phase)
        scale = width / view_w
        matrix = np.array([[scale, 0, width / 2 - center_x * scale],
                           [0, scale, height / 2 - center_y * scale]], dtype=np.float64)
        yield cv2.warpAffine(photo, matrix, size, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)


def capture_frames(source: str, count: int) -> Iterator[np.ndarray]:
    """Frames from a camera index or a video file."""
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        raise SightlineError(f"cannot open {source!r} as a camera index or video file")
    try:
        for _ in range(count):
            ok, frame = capture.read()
            if not ok:
                return
            yield frame
    finally:
        capture.release()


def run_demo(*, source: str | None, frames: int, out_dir: Path, model: str = "centerface",
             fps: float = 30.0, console: Console | None = None) -> dict:
    console = console or Console()
    bundle = resolve_bundle(model)
    console.print(f"model [bold]{bundle.name}@{bundle.version}[/] ({bundle.manifest.task})")
    sequence = list(capture_frames(source, frames) if source else astronaut_sequence(frames))
    if not sequence:
        raise SightlineError(f"{source!r} gave no frames")

    with tempfile.TemporaryDirectory(prefix="sightline-demo-") as tmp:
        endpoint = f"ipc://{tmp}/demo.sock"
        # The demo uses the real link: a throw-away daemon keypair and one enrolled headset.
        keys, client_keys = throwaway_keys(Path(tmp))
        config = ServeConfig(server=ServerSettings(endpoints=(endpoint,)),
                             security=SecuritySettings(keys_dir=str(keys)))
        server = Server(config, [bundle])
        server.bind()
        stop = threading.Event()
        io_thread = threading.Thread(target=server.serve, args=(stop,), name="sightline-io")
        io_thread.start()
        console.print("link: CurveZMQ, encrypted; headset authenticated by its enrolled key")
        try:
            replies, elapsed = _stream(endpoint, sequence, fps, console, client_keys)
        finally:
            stop.set()
            io_thread.join()
    summary = _write_outputs(sequence, replies, out_dir)
    _print_report(console, replies, elapsed, len(sequence), summary)
    return summary


def _stream(endpoint: str, sequence: list[np.ndarray], fps: float, console: Console,
            keys: dict) -> tuple[dict[int, Reply], float]:
    replies: dict[int, Reply] = {}
    seq_to_index: dict[int, int] = {}
    done = threading.Event()

    def on_reply(reply: Reply) -> None:
        if reply.seq in seq_to_index:
            replies[seq_to_index[reply.seq]] = reply
        if len(replies) == len(sequence):
            done.set()

    with Client(endpoint, max_in_flight=2, on_reply=on_reply, **keys) as client:
        if not client.wait_connected(10):
            raise SightlineError(f"the demo daemon at {endpoint} did not accept a connection")
        columns = (TextColumn("streaming"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn())
        start = time.perf_counter()
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("frames", total=len(sequence))
            for index, frame in enumerate(sequence):
                # Pace like a camera; a frame the daemon cannot take now is simply skipped.
                time.sleep(max(0.0, start + index / fps - time.perf_counter()))
                seq = client.send(frame)
                if seq is not None:
                    seq_to_index[seq] = index
                else:
                    replies[index] = Reply("not_sent", None, {})
                progress.advance(task)
        done.wait(timeout=client.reply_timeout + 1)
        elapsed = time.perf_counter() - start
    return replies, elapsed


def _write_outputs(sequence: list[np.ndarray], replies: dict[int, Reply], out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    height, width = sequence[0].shape[:2]
    video_path = out_dir / "annotated.mp4"
    writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (width, height))
    annotated = []
    records = []
    for index, frame in enumerate(sequence):
        reply = replies.get(index)
        detections = reply.detections if reply is not None and reply.ok else ()
        note = f"frame {index}" + ("" if reply is not None and reply.ok else
                                   f" ({reply.kind if reply else 'no reply'})")
        image = draw_detections(frame, detections, note)
        annotated.append(image)
        if writer.isOpened():
            writer.write(image)
        records.append({"frame": index, "kind": reply.kind if reply else None,
                        "detections": [d.to_wire() for d in detections]})
    writer.release()
    strip_path = out_dir / "strip.jpg"
    picks = np.linspace(0, len(annotated) - 1, num=6).astype(int)  # 2 rows of 3 frames
    tiles = [cv2.resize(annotated[i], (width // 2, height // 2)) for i in picks]
    cv2.imwrite(str(strip_path), np.vstack([np.hstack(tiles[:3]), np.hstack(tiles[3:])]))
    results_path = out_dir / "results.jsonl"
    results_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"video": str(video_path) if video_path.exists() else None,
            "strip": str(strip_path), "results": str(results_path),
            "frames_with_faces": sum(1 for r in records if r["detections"])}


def _print_report(console: Console, replies: dict[int, Reply], elapsed: float, total: int,
                  summary: dict) -> None:
    results = [r for r in replies.values() if r.ok]
    series: dict[str, list[float]] = {}
    for reply in results:
        for stage, ms in stage_durations_ms(reply.stamps).items():
            series.setdefault(stage, []).append(ms)
        series.setdefault("round trip (client)", []).append(reply.round_trip_s * 1e3)
    console.print(latency_table("Latency per stage", series))
    kinds = [r.kind for r in replies.values()]
    console.print(
        f"frames {total}, results {len(results)}, "
        f"dropped {kinds.count('dropped')}, not sent {kinds.count('not_sent')}, "
        f"lost {kinds.count('lost')}, errors {kinds.count('error')}; "
        f"{len(results) / elapsed:.1f} results/s over {elapsed:.1f} s"
    )
    console.print(f"faces found in {summary['frames_with_faces']} of {total} frames")
    console.print(f"annotated video: {summary['video']}\nimage strip:     {summary['strip']}\n"
                  f"per-frame JSON:  {summary['results']}")
