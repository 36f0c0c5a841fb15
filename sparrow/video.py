"""Video input: decode mp4/webm bytes or files with PyAV, sample frames, resize; encode for the demo.

Everything returns uint8 frames `[N, H, W, 3]` (RGB). Bad input raises a `VideoError` subclass that
names the problem, so a server can turn it into a clear error response.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter


class VideoError(ValueError):
    """The input is not a usable video."""


class EmptyVideoError(VideoError):
    """No bytes, or a container with no decodable frame."""


class CorruptVideoError(VideoError):
    """The bytes are not a video container PyAV can open or decode."""


class UnsupportedVideoError(VideoError):
    """A container without a video stream, or a request this module cannot satisfy."""


# x264 on one thread: its output then does not depend on the machine's core count (a frame-threaded
# encode differs in the last bits), and target training, which encodes eight small videos per step
# beside torch's own threads, does not oversubscribe the cores
CODECS = {"mp4": ("libx264", {"preset": "veryfast", "threads": "1"}), "webm": ("libvpx-vp9", {"b:v": "0"})}


def encode(frames: np.ndarray, fmt: str = "mp4", fps: int = 8, crf: int = 12) -> bytes:
    """Encode uint8 frames `[N, H, W, 3]` as H.264 mp4 or VP9 webm (even sizes; yuv420p like real footage)."""
    frames = _check_frames(frames)
    if fmt not in CODECS:
        raise UnsupportedVideoError(f"cannot encode {fmt!r}; supported: {sorted(CODECS)}")
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise UnsupportedVideoError(f"yuv420p needs even frame sizes, got {h}x{w}")
    codec, options = CODECS[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), **options}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def decode(source: bytes | str | Path, num_frames: int | None = None,
           size: tuple[int, int] | None = None, max_frames: int = 4096) -> np.ndarray:
    """Decode a video to uint8 `[N, H, W, 3]`.

    num_frames: sample this many frames uniformly over the video (None: keep every frame, up to
    `max_frames`). size: (height, width) to resize to (None: keep the stored size).
    """
    if num_frames is not None and num_frames < 1:
        raise UnsupportedVideoError(f"num_frames must be at least 1, got {num_frames}")
    frames = _decode_all(source, max_frames)
    if num_frames is not None:
        frames = sample_uniform(frames, num_frames)
    if size is not None:
        frames = resize(frames, size)
    return frames


def _decode_all(source: bytes | str | Path, max_frames: int) -> np.ndarray:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise EmptyVideoError("video is empty (0 bytes)")
        name, handle = "<bytes>", io.BytesIO(bytes(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise VideoError(f"video file not found: {path}")
        if path.stat().st_size == 0:
            raise EmptyVideoError(f"video file is empty (0 bytes): {path}")
        name, handle = str(path), str(path)
    try:
        container = av.open(handle, mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise CorruptVideoError(f"cannot open video {name}: {e}") from e
    with container:
        if not container.streams.video:
            raise UnsupportedVideoError(f"{name} has no video stream")
        # one converter for the whole stream: `frame.to_ndarray(format=...)` builds a new swscale
        # context per frame, which cost two thirds of decoding a small demo video
        frames, rgb = [], VideoReformatter()
        try:
            for frame in container.decode(video=0):
                if len(frames) == max_frames:
                    raise UnsupportedVideoError(
                        f"{name} has more than {max_frames} frames; pass num_frames to sample fewer "
                        "or raise max_frames")
                frames.append(rgb.reformat(frame, format="rgb24").to_ndarray())
        except av.error.FFmpegError as e:
            if not frames:
                raise CorruptVideoError(f"cannot decode video {name}: {e}") from e
            # a truncated tail still yields the frames before it, as players do
    if not frames:
        raise EmptyVideoError(f"{name} contains no decodable video frame")
    return np.stack(frames)  # [N, H, W, 3]


def sample_uniform(frames: np.ndarray, num_frames: int) -> np.ndarray:
    """Pick `num_frames` frames at the centres of equal time bins (repeats frames if asked for more)."""
    n = len(frames)
    idx = np.minimum(((np.arange(num_frames) + 0.5) * n / num_frames).astype(np.int64), n - 1)
    return frames[idx]


def resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of uint8 `[N, H, W, 3]` to `[N, size[0], size[1], 3]`."""
    import torch
    import torch.nn.functional as F

    frames = _check_frames(frames)
    h, w = size
    if h < 1 or w < 1:
        raise UnsupportedVideoError(f"resize target must be positive, got {size}")
    if frames.shape[1:3] == (h, w):
        return frames
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [N, 3, H, W]
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise UnsupportedVideoError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise UnsupportedVideoError(f"frames must have shape [N>=1, H, W, 3], got {list(frames.shape)}")
    return frames
