"""`sightline demo`: the whole path on one machine, with output a person can look at.

Starts a daemon in this process, streams a real image sequence through it with the
client SDK at the source's frame rate, draws the overlays that come back, and prints a
latency table. The default sequence pans and zooms over a real photograph; with depth
(the synthetic RGB-D astronaut, or a recording) it asks for tracks, anchors and planes.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from runtime.client import Client, Reply
from runtime.config import SecuritySettings, ServeConfig, ServerSettings
from runtime.curve_keys import throwaway_keys
from runtime.daemon.server import Server
from runtime.errors import SightlineError
from runtime.models.bundle import Bundle
from runtime.overlay import draw_reply
from runtime.tools.demo_frames import (
    DemoFrame,
    astronaut_sequence,
    capture_frames,
    rgbd_recording,
)
from runtime.tools.latency import latency_table, stage_durations_ms


def run_demo(*, bundle: Bundle, source: str | None, frames: int, out_dir: Path,
             fps: float = 30.0, depth: bool = False, rgbd: Path | None = None,
             console: Console | None = None, cascades: tuple = (),
             cascade_bundles: dict[str, Bundle] | None = None,
             sequence: list[DemoFrame] | None = None) -> dict:
    """Stream `source` (a camera or video), a recording in `rgbd`, the astronaut sequence
    (with synthetic depth when `depth`) or a given `sequence` through an in-process daemon
    (with `cascades` on its model); write and print what came back. Depth runs ask for
    tracks, 3D anchors and planes."""
    console = console or Console()
    console.print(f"model [bold]{bundle.name}@{bundle.version}[/] ({bundle.manifest.task})")
    for entry in cascades:
        console.print(f"cascade: {entry.run} on each {entry.on} object")
    if sequence is not None:
        pass
    elif rgbd is not None:
        sequence = rgbd_recording(rgbd, frames)
    elif depth:
        from runtime.tools.depth_scene import astronaut_rgbd  # only depth runs need it

        sequence = list(astronaut_rgbd(frames))
    else:
        sequence = [DemoFrame(frame) for frame in
                    (capture_frames(source, frames) if source else astronaut_sequence(frames))]
    if not sequence:
        raise SightlineError(f"{source!r} gave no frames")
    spatial = sequence[0].depth is not None
    if spatial:
        _preload_open3d(console)

    with tempfile.TemporaryDirectory(prefix="sightline-demo-") as tmp:
        endpoint = f"ipc://{tmp}/demo.sock"
        # The demo uses the real link: a throw-away daemon keypair and one enrolled headset.
        keys, client_keys = throwaway_keys(Path(tmp))
        config = ServeConfig(server=ServerSettings(endpoints=(endpoint,)),
                             security=SecuritySettings(keys_dir=str(keys)), cascades=cascades)
        server = Server(config, [bundle], cascade_bundles=cascade_bundles)
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
    if spatial:
        summary["spatial"] = spatial_summary([replies.get(i) for i in range(len(sequence))])
    _print_report(console, replies, elapsed, len(sequence), summary)
    return summary


def _preload_open3d(console: Console) -> None:
    # The daemon runs in this process: importing Open3D now keeps its ~1 s import out of
    # the first frame's spatial stage. Without it the replies say what is missing.
    from runtime.spatial.errors import SpatialUnavailable
    from runtime.spatial.open3d_loader import load_open3d

    try:
        load_open3d()
    except SpatialUnavailable as exc:
        console.print(f"[yellow]planes unavailable:[/] {exc}")


def _stream(endpoint: str, sequence: list[DemoFrame], fps: float, console: Console,
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
                seq = client.send(frame.color, **_spatial_request(frame))
                if seq is not None:
                    seq_to_index[seq] = index
                else:
                    replies[index] = Reply("not_sent", None, {})
                progress.advance(task)
        done.wait(timeout=client.reply_timeout + 1)
        elapsed = time.perf_counter() - start
    return replies, elapsed


def _spatial_request(frame: DemoFrame) -> dict:
    if frame.depth is None:
        return {}
    return {"depth": frame.depth, "intrinsics": frame.intrinsics.to_wire(),
            "pose": None if frame.pose is None else frame.pose.to_wire(),
            "spatial": True, "planes": True}


def _write_outputs(sequence: list[DemoFrame], replies: dict[int, Reply], out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    height, width = sequence[0].color.shape[:2]
    video_path = out_dir / "annotated.mp4"
    writer = cv2.VideoWriter(str(video_path), cv2.VideoWriter_fourcc(*"mp4v"), 30, (width, height))
    annotated = []
    records = []
    for index, frame in enumerate(sequence):
        reply = replies.get(index)
        ok = reply is not None and reply.ok
        message = reply.message if ok else {}
        note = f"frame {index}" + ("" if ok else f" ({reply.kind if reply else 'no reply'})")
        # The reply echoes the request's intrinsics and pose; the frame's are the same.
        image = draw_reply(frame.color, message, note=note,
                           intrinsics=None if frame.intrinsics is None else
                           frame.intrinsics.to_wire(),
                           pose=None if frame.pose is None else frame.pose.to_wire())
        annotated.append(image)
        if writer.isOpened():
            writer.write(image)
        record = {"frame": index, "kind": reply.kind if reply else None,
                  "detections": message.get("detections", [])}
        for key in ("classes", "detector_skipped"):  # the mask is in the video, not here
            if key in message:
                record[key] = message[key]
        if "mask" in message:
            record["mask"] = {k: v for k, v in message["mask"].items() if k != "data"}
        if frame.depth is not None:
            record.update(tracks=message.get("tracks", []), planes=message.get("planes"))
            if "spatial_error" in message:
                record["spatial_error"] = message["spatial_error"]
        records.append(record)
    writer.release()
    strip_path = out_dir / "strip.jpg"
    picks = np.linspace(0, len(annotated) - 1, num=6).astype(int)  # 2 rows of 3 frames
    tiles = [cv2.resize(annotated[i], (width // 2, height // 2)) for i in picks]
    cv2.imwrite(str(strip_path), np.vstack([np.hstack(tiles[:3]), np.hstack(tiles[3:])]))
    results_path = out_dir / "results.jsonl"
    results_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"video": str(video_path) if video_path.exists() else None,
            "strip": str(strip_path), "results": str(results_path),
            "frames_with_faces": sum(1 for r in records if r["detections"]),
            "frames_with_mask": sum(1 for r in records if "mask" in r)}


def spatial_summary(replies: list[Reply | None]) -> dict:
    """What the spatial results of a run add up to: the track ids seen; for the track seen
    in most frames, how far its world anchors (or, without poses, its depths) spread; the
    planes found (the last reply's view of each id); the spatial errors reported."""
    frames_of: dict[int, int] = {}
    labels: dict[int, str] = {}
    world: dict[int, list] = {}
    depths: dict[int, list] = {}
    planes: dict[int, dict] = {}
    plane_frame = None
    errors: list[str] = []
    for reply in replies:
        if reply is None or not reply.ok:
            continue
        message = reply.message
        if message.get("spatial_error") and message["spatial_error"] not in errors:
            errors.append(message["spatial_error"])
        for track in message.get("tracks", ()):
            track_id = track["track_id"]
            frames_of[track_id] = frames_of.get(track_id, 0) + 1
            labels[track_id] = track["detection"]["label"]
            anchor = track.get("anchor") or {}
            if anchor.get("world_xyz") is not None:
                world.setdefault(track_id, []).append(anchor["world_xyz"])
            if anchor.get("depth_m") is not None:
                depths.setdefault(track_id, []).append(anchor["depth_m"])
        if message.get("planes"):
            plane_frame = message["planes"]["frame"]
            for plane in message["planes"]["planes"]:
                planes[plane["id"]] = plane
    main = min(frames_of, key=lambda t: (-frames_of[t], t)) if frames_of else None
    summary: dict = {"track_ids": sorted(frames_of), "track": main,
                     "label": labels.get(main), "frames": frames_of.get(main, 0),
                     "planes": [planes[i] for i in sorted(planes)], "plane_frame": plane_frame,
                     "errors": errors}
    points = np.asarray(world.get(main, ()), dtype=np.float64).reshape(-1, 3)
    summary["world_anchors"] = len(points)
    summary["world_spread_m"] = (
        float(np.linalg.norm(points - points.mean(axis=0), axis=1).max()) if len(points)
        else None)
    summary["world_mean"] = points.mean(axis=0).tolist() if len(points) else None
    summary["depth_range_m"] = ((min(depths[main]), max(depths[main])) if depths.get(main)
                                else None)
    return summary


def _stage_series(reply: Reply) -> dict[str, float]:
    stamps = reply.stamps
    durations = stage_durations_ms(stamps)
    # The spatial and annotate stages follow output decoding when a frame asks for them.
    extra = {}
    if "spatial" in stamps and "postprocessed" in stamps:
        extra["spatial"] = (stamps["spatial"] - stamps["postprocessed"]) * 1e3
    if "annotated" in stamps:
        before = stamps.get("spatial", stamps.get("postprocessed"))
        if before is not None:
            extra["annotate"] = (stamps["annotated"] - before) * 1e3
    ordered = {k: v for k, v in durations.items() if k != "daemon total"}
    for name, ms in extra.items():
        ordered.setdefault(name, ms)
    if "daemon total" in durations:
        ordered["daemon total"] = durations["daemon total"]
    return ordered


def _print_report(console: Console, replies: dict[int, Reply], elapsed: float, total: int,
                  summary: dict) -> None:
    results = [r for r in replies.values() if r.ok]
    series: dict[str, list[float]] = {}
    for reply in results:
        for stage, ms in _stage_series(reply).items():
            series.setdefault(stage, []).append(ms)
        if reply.round_trip_s is not None:  # None: it came after the client gave up on it
            series.setdefault("round trip (client)", []).append(reply.round_trip_s * 1e3)
    console.print(latency_table("Latency per stage", series))
    kinds = [r.kind for r in replies.values()]
    console.print(
        f"frames {total}, results {len(results)}, "
        f"dropped {kinds.count('dropped')}, not sent {kinds.count('not_sent')}, "
        f"lost {kinds.count('lost')}, errors {kinds.count('error')}; "
        f"{len(results) / elapsed:.1f} results/s over {elapsed:.1f} s"
    )
    console.print(f"objects found in {summary['frames_with_faces']} of {total} frames")
    if summary.get("frames_with_mask"):
        console.print(f"masks in {summary['frames_with_mask']} of {total} frames")
    if "spatial" in summary:
        _print_spatial(console, summary["spatial"])
    console.print(f"annotated video: {summary['video']}\nimage strip:     {summary['strip']}\n"
                  f"per-frame JSON:  {summary['results']}")


def _print_spatial(console: Console, spatial: dict) -> None:
    ids = ", ".join(f"#{t}" for t in spatial["track_ids"]) or "none"
    console.print(f"track ids seen: {ids}")
    if spatial["track"] is not None:
        name = f"{spatial['label']} #{spatial['track']}"
        if spatial["world_spread_m"] is not None:
            x, y, z = spatial["world_mean"]
            console.print(
                f"{name}: world anchor in {spatial['world_anchors']} of {spatial['frames']} "
                f"frames, at ({x:.3f}, {y:.3f}, {z:.3f}) m, spread "
                f"{spatial['world_spread_m'] * 1e3:.1f} mm (largest distance from the mean)")
        elif spatial["depth_range_m"] is not None:
            low, high = spatial["depth_range_m"]
            console.print(f"{name}: camera coordinates only (no poses); depth "
                          f"{low:.3f}-{high:.3f} m over {spatial['frames']} frames")
        else:
            console.print(f"{name}: no depth at the detections")
    if spatial["planes"]:
        console.print(f"planes found ({spatial['plane_frame']} coordinates):")
        for plane in spatial["planes"]:
            nx, ny, nz = plane["normal"]
            width, height = plane["extent"]
            console.print(f"  plane {plane['id']}: normal ({nx:+.2f}, {ny:+.2f}, {nz:+.2f}), "
                          f"offset {plane['offset']:+.3f} m, {width:.2f} x {height:.2f} m")
    else:
        console.print("planes found: none")
    for error in spatial["errors"]:
        console.print(f"[yellow]spatial:[/] {error}")
