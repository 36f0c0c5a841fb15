import io

import av
import numpy as np
import pytest

from sparrow.demo.world import make_scene, render
from sparrow.video import (CorruptVideoError, EmptyVideoError, UnsupportedVideoError, VideoError, decode,
                           encode, resize, sample_uniform)


@pytest.fixture(scope="module")
def frames():
    return render(make_scene(11), 24, 64, 96)  # [24, 64, 96, 3]


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_round_trip_real_file(tmp_path, frames, fmt):
    path = tmp_path / f"v.{fmt}"
    path.write_bytes(encode(frames, fmt))
    out = decode(path)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    # lossy codecs: close on average, and every frame is the right frame (not a neighbour)
    err = np.abs(out.astype(int) - frames.astype(int)).mean(axis=(1, 2, 3))
    assert err.max() < 4.0
    assert decode(path.read_bytes()).shape == frames.shape


def test_decode_equals_pyav_per_frame_conversion(frames):
    """One converter per stream gives the same pixels as PyAV's own per-frame `to_ndarray`."""
    for fmt in ("mp4", "webm"):
        data = encode(frames, fmt)
        with av.open(io.BytesIO(data)) as c:
            want = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        np.testing.assert_array_equal(decode(data), want)


def test_sample_and_resize(frames):
    data = encode(frames)
    out = decode(data, num_frames=6, size=(32, 48))
    assert out.shape == (6, 32, 48, 3)
    idx = ((np.arange(6) + 0.5) * 24 / 6).astype(int)
    ref = resize(sample_uniform(decode(data), 6), (32, 48))
    assert np.array_equal(out, ref)
    assert list(idx) == [2, 6, 10, 14, 18, 22]
    assert np.array_equal(sample_uniform(frames, 6), frames[idx])
    # asking for more frames than stored repeats frames rather than inventing them
    assert decode(data, num_frames=48).shape[0] == 48


def test_empty_input(tmp_path):
    with pytest.raises(EmptyVideoError, match="empty"):
        decode(b"")
    p = tmp_path / "empty.mp4"
    p.write_bytes(b"")
    with pytest.raises(EmptyVideoError, match="empty"):
        decode(p)


def test_corrupt_input(frames):
    with pytest.raises(CorruptVideoError, match="cannot open"):
        decode(b"this is not a video" * 50)
    with pytest.raises(CorruptVideoError):
        decode(encode(frames)[:300])  # header cut off mid-way


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="not found"):
        decode(tmp_path / "nope.mp4")


def test_audio_only_container_is_unsupported():
    buf = io.BytesIO()
    with av.open(buf, "w", format="ogg") as c:
        s = c.add_stream("libopus", rate=48000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), dtype=np.float32), format="flt", layout="mono")
        frame.sample_rate = 48000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(UnsupportedVideoError, match="no video stream"):
        decode(buf.getvalue())


def test_too_many_frames(frames):
    with pytest.raises(UnsupportedVideoError, match="more than 10 frames"):
        decode(encode(frames), max_frames=10)


def test_bad_frames_for_encode():
    with pytest.raises(UnsupportedVideoError, match="uint8"):
        encode(np.zeros((2, 16, 16, 3), dtype=np.float32))
    with pytest.raises(UnsupportedVideoError, match="shape"):
        encode(np.zeros((16, 16, 3), dtype=np.uint8))
    with pytest.raises(UnsupportedVideoError, match="even"):
        encode(np.zeros((2, 15, 16, 3), dtype=np.uint8))
