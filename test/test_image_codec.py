"""Tests for wildseg3d_ros.core.camera.image_codec (ROS-free cv_bridge equivalents)."""
import array
import struct
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wildseg3d_ros.core.camera.image_codec import (ImageDecodeError, bytes_per_pixel, decode_compressed, decode_depth, decode_image, encode_compressed, encode_compressed_depth, encode_image, validate_camera_info)

RNG = np.random.default_rng(1234)
COLOR = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"]


def _rgb(h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth_rgb(h=48, w=64):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
    return img.astype(np.uint8)


# ------------------------------------------------------------------------------ exact layouts

def test_bgr8_with_step_padding_known_bytes():
    # 2x2 bgr8, step 8 (2 bytes of padding per row filled with garbage 0xEE)
    data = bytes([1, 2, 3, 4, 5, 6, 0xEE, 0xEE,
                  7, 8, 9, 10, 11, 12, 0xEE, 0xEE])
    out = decode_image("bgr8", 2, 2, 8, data)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, [[[3, 2, 1], [6, 5, 4]], [[9, 8, 7], [12, 11, 10]]])
    assert out.flags.c_contiguous and out.flags.writeable


def test_rgba_bgra_mono_known_bytes():
    np.testing.assert_array_equal(decode_image("rgba8", 1, 1, 4, b"\x01\x02\x03\x04"), [[[1, 2, 3]]])
    np.testing.assert_array_equal(decode_image("bgra8", 1, 1, 4, b"\x01\x02\x03\x04"), [[[3, 2, 1]]])
    np.testing.assert_array_equal(decode_image("mono8", 1, 2, 3, b"\x05\x09\xff"), [[[5, 5, 5], [9, 9, 9]]])
    # cv_bridge aliases
    np.testing.assert_array_equal(decode_image("8UC3", 1, 1, 3, b"\x01\x02\x03"), [[[3, 2, 1]]])
    np.testing.assert_array_equal(decode_image("8UC1", 1, 1, 1, b"\x07"), [[[7, 7, 7]]])


def test_depth_endianness_known_bytes():
    # 1000 mm = 0x03E8
    be = decode_image("16UC1", 1, 1, 2, b"\x03\xe8", is_bigendian=1)
    le = decode_image("16UC1", 1, 1, 2, b"\xe8\x03", is_bigendian=0)
    assert be.dtype == np.float32 and be.shape == (1, 1)
    assert be[0, 0] == pytest.approx(1.0) and le[0, 0] == pytest.approx(1.0)
    assert decode_image("16UC1", 1, 1, 2, b"\x03\xe8", is_bigendian=0)[0, 0] == pytest.approx(59.395)
    f = struct.pack(">f", 2.5)
    assert decode_image("32FC1", 1, 1, 4, f, is_bigendian=1)[0, 0] == 2.5
    assert decode_image("32FC1", 1, 1, 4, f[::-1], is_bigendian=0)[0, 0] == 2.5
    # mono16 is accepted as millimetre depth
    assert decode_image("mono16", 1, 1, 2, b"\xe8\x03")[0, 0] == pytest.approx(1.0)


def test_odd_step_16bit_unaligned():
    # step 5 for a 2-pixel 16UC1 row (1 pad byte): rows start at unaligned offsets
    mm = np.array([[100, 200], [300, 65535]], np.uint16)
    enc, h, w, s, data = encode_image(mm, "16UC1", step=5)
    assert s == 5 and len(data) == 10
    np.testing.assert_allclose(decode_image(enc, h, w, s, data), mm / 1000.0, rtol=1e-7)


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "ndarray", "array", "list"])
def test_data_container_types(kind):
    img = _rgb(3, 4)
    enc, h, w, s, data = encode_image(img, "bgr8", step=16)
    conv = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview,
            "ndarray": lambda d: np.frombuffer(d, np.uint8), "array": lambda d: array.array("B", d),
            "list": list}[kind]
    np.testing.assert_array_equal(decode_image(enc, h, w, s, conv(data)), img)


def test_output_does_not_alias_input():
    img = _rgb(4, 4)
    buf = bytearray(encode_image(img, "rgb8")[4])
    out = decode_image("rgb8", 4, 4, 12, buf)
    buf[0] = (buf[0] + 1) % 256
    assert out[0, 0, 0] == img[0, 0, 0]


# ------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("enc", COLOR + ["16UC1", "32FC1"])
@pytest.mark.parametrize("pad", [0, 3, 64])
@pytest.mark.parametrize("big", [0, 1])
def test_roundtrip_exact(enc, pad, big):
    h, w = 6, 9
    if enc == "mono8":
        src = RNG.integers(0, 256, (h, w), dtype=np.uint8)
        expect = np.repeat(src[..., None], 3, axis=2)
    elif enc == "16UC1":
        src = RNG.integers(0, 65536, (h, w)).astype(np.uint16)
        expect = src.astype(np.float32) * np.float32(1e-3)
    elif enc == "32FC1":
        src = RNG.normal(2, 1, (h, w)).astype(np.float32)
        src[0, 0] = np.nan
        expect = src
    else:
        src = _rgb(h, w, seed=pad + big)
        expect = src
    step = w * bytes_per_pixel(enc) + pad
    e, hh, ww, s, data = encode_image(src, enc, step=step, is_bigendian=bool(big))
    assert (hh, ww, s, len(data)) == (h, w, step, step * h)
    out = decode_image(e, hh, ww, s, data, is_bigendian=big)
    np.testing.assert_array_equal(out, expect)
    if enc == "16UC1":  # metres -> millimetres -> metres is exact too
        e2 = encode_image(out, "16UC1", is_bigendian=bool(big))
        assert e2[4] == encode_image(src, "16UC1", is_bigendian=bool(big))[4]


def test_encode_16uc1_from_metres_invalid_to_zero():
    m = np.array([[1.2344, 1.2346, np.nan, -1.0, np.inf, 70.0, 0.0]], np.float32)
    e, h, w, s, data = encode_image(m, "16UC1")
    np.testing.assert_array_equal(np.frombuffer(data, "<u2"), [1234, 1235, 0, 0, 0, 0, 0])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(enc=st.sampled_from(COLOR + ["16UC1", "32FC1"]), h=st.integers(1, 9), w=st.integers(1, 9),
       pad=st.integers(0, 9), big=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_roundtrip_property(enc, h, w, pad, big, seed):
    rng = np.random.default_rng(seed)
    if enc == "mono8":
        src = rng.integers(0, 256, (h, w), dtype=np.uint8)
        expect = np.repeat(src[..., None], 3, axis=2)
    elif enc == "16UC1":
        src = rng.integers(0, 65536, (h, w)).astype(np.uint16)
        expect = src.astype(np.float32) * np.float32(1e-3)
    elif enc == "32FC1":
        src = rng.normal(0, 100, (h, w)).astype(np.float32)
        expect = src
    else:
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expect = src
    e, hh, ww, s, data = encode_image(src, enc, step=w * bytes_per_pixel(enc) + pad, is_bigendian=big)
    np.testing.assert_array_equal(decode_image(e, hh, ww, s, data, is_bigendian=int(big)), expect)


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("args, match", [
    (("yuv422", 2, 2, 4, bytes(8)), "unsupported image encoding"),
    (("rgb8", 2, 2, 5, bytes(20)), "step 5 is smaller"),
    (("rgb8", 2, 2, 6, bytes(11)), "data has 11 bytes"),
    (("rgb8", 0, 2, 6, b""), "zero-size"),
    (("rgb8", 2, 0, 0, b""), "zero-size"),
    (("rgb8", -1, 2, 6, b""), "zero-size"),
    (("rgb8", 2.0, 2, 6, bytes(12)), "height must be an integer"),
    ((None, 2, 2, 6, bytes(12)), "encoding must be a string"),
    (("rgb8", 2, 2, 6, None), "missing"),
    (("16UC1", 2, 2, 3, bytes(12)), "step 3 is smaller"),
])
def test_decode_errors(args, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(*args)


def test_max_pixels_cap_checked_before_data():
    # the cap is enforced from the header alone (data far too short is not even looked at)
    with pytest.raises(ImageDecodeError, match="exceeds the cap"):
        decode_image("rgb8", 10000, 10000, 30000, b"", max_pixels=1_000_000)
    assert decode_image("rgb8", 2, 2, 6, bytes(12), max_pixels=4).shape == (2, 2, 3)


def test_decode_depth_cleans_and_counts():
    d = np.array([[np.nan, np.inf, -np.inf, -1.0], [0.0, 2.0, 3.5, 1e-3]], np.float32)
    depth, stats = decode_depth(*encode_image(d, "32FC1")[:5])
    np.testing.assert_array_equal(depth, np.array([[0, 0, 0, 0], [0, 2.0, 3.5, 1e-3]], np.float32))
    assert stats == {"total": 8, "nan": 1, "inf": 2, "negative": 1, "invalid": 5, "valid": 3}
    mm = np.array([[0, 1500], [0, 0]], np.uint16)
    depth, stats = decode_depth(*encode_image(mm, "16UC1", is_bigendian=True)[:5], is_bigendian=1)
    np.testing.assert_allclose(depth, [[0, 1.5], [0, 0]])
    assert stats["valid"] == 1 and stats["invalid"] == 3 and stats["nan"] == 0
    allbad = np.full((2, 2), np.nan, np.float32)
    depth, stats = decode_depth(*encode_image(allbad, "32FC1")[:5])
    assert stats["valid"] == 0 and not depth.any()
    with pytest.raises(ImageDecodeError, match="colour encoding"):
        decode_depth("rgb8", 1, 1, 3, bytes(3))


_ENC_ANY = st.one_of(st.sampled_from(COLOR + ["16UC1", "32FC1", "mono16", "8UC3", "RGB8", " bgr8 "]),
                     st.text(max_size=8))
_INTS = st.one_of(st.integers(-3, 40), st.integers(-2 ** 40, 2 ** 40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(enc=_ENC_ANY, h=_INTS, w=_INTS, step=_INTS, data=st.binary(max_size=2000), big=st.integers(0, 1),
       cap=st.one_of(st.none(), st.integers(0, 200)))
def test_decode_any_input_result_or_clear_error(enc, h, w, step, data, big, cap):
    for fn in (decode_image, decode_depth):
        try:
            out = fn(enc, h, w, step, data, big, cap)
        except ImageDecodeError as e:
            assert str(e)
            continue
        arr = out[0] if fn is decode_depth else out
        assert arr.shape[:2] == (h, w)
        assert h * w * bytes_per_pixel(enc) <= len(data)
        if cap is not None:
            assert h * w <= cap
        if fn is decode_depth:
            assert np.isfinite(arr).all() and (arr >= 0).all()
            assert out[1]["valid"] + out[1]["invalid"] == h * w


# ------------------------------------------------------------------------------ compressed

def test_png_roundtrip_exact_and_jpeg_close():
    img = _smooth_rgb()
    np.testing.assert_array_equal(decode_compressed("png", encode_compressed(img, "png")), img)
    np.testing.assert_array_equal(decode_compressed("rgb8; png compressed bgr8", encode_compressed(img, "png")), img)
    out = decode_compressed("bgr8; jpeg compressed bgr8", encode_compressed(img, "jpeg", quality=95))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() < 2.0
    # channels are not swapped: red stays red
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    assert (decode_compressed("jpeg", encode_compressed(red, "jpeg"))[..., 0] > 240).all()
    grey = img[..., 0]
    g = decode_compressed("mono8; png compressed mono8", encode_compressed(grey, "png"))
    np.testing.assert_array_equal(g, np.repeat(grey[..., None], 3, 2))


def test_compressed_depth_png_with_and_without_header():
    mm = RNG.integers(0, 65536, (12, 10)).astype(np.uint16)
    d = mm.astype(np.float32) / 1000
    fmt, data = encode_compressed_depth(d, header=True)
    assert len(data) > 12 and data[12:20] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode_compressed(fmt, data), mm.astype(np.float32) * np.float32(1e-3))
    fmt2, data2 = encode_compressed_depth(d, header=False)
    np.testing.assert_array_equal(decode_compressed(fmt2, data2), mm.astype(np.float32) * np.float32(1e-3))
    # header also detected under the plain-png format string
    np.testing.assert_array_equal(decode_compressed("16UC1; png compressed", data), decode_compressed(fmt, data))


def test_compressed_depth_32fc1_inverse_quantisation():
    qa, qb = 1000.0, 10.0  # depth = qa / (v - qb)
    depth = np.array([[0.5, 1.0, 2.0], [4.0, 0.0, 8.0]], np.float32)
    v = np.where(depth > 0, np.rint(qa / np.where(depth > 0, depth, 1) + qb), 0).astype(np.uint16)
    ok, png = cv2.imencode(".png", v)
    data = struct.pack("<iff", 0, qa, qb) + png.tobytes()
    out = decode_compressed("32FC1; compressedDepth png", data)
    expect = np.where(v > 0, qa / (v.astype(np.float32) - qb), 0)
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    np.testing.assert_allclose(out, depth, rtol=1e-6)
    assert out[1, 1] == 0
    with pytest.raises(ImageDecodeError, match="quantisation"):
        decode_compressed("32FC1; compressedDepth png", png.tobytes())


def _png_bomb_header(w, h):
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_compressed_errors():
    img = _smooth_rgb()
    png = encode_compressed(img, "png")
    jpg = encode_compressed(img, "jpeg")
    cases = [
        ("png", b""),
        ("png", b"not an image at all"),
        ("png", png[:40]),                       # truncated in the middle of the data
        ("png", png[:8] + bytes(len(png) - 8)),  # header destroyed
        ("jpeg", jpg[:2]),                        # SOI only
        ("jpeg", b"\xff\xd8" + bytes(100)),
        ("bmp", b"BM" + bytes(60)),               # other formats are refused
        ("16UC1; compressedDepth png", jpg),      # depth must be PNG
        ("16UC1; compressedDepth rvl", b"\x00" * 20),
        ("32FC1; png compressed", png),           # colour PNG as depth
    ]
    for fmt, data in cases:
        with pytest.raises(ImageDecodeError):
            decode_compressed(fmt, data)
    with pytest.raises(ImageDecodeError, match="exceeds the cap"):
        decode_compressed("png", _png_bomb_header(100000, 100000), max_pixels=10 ** 7)
    with pytest.raises(ImageDecodeError, match="exceeds the cap"):
        decode_compressed("jpeg", jpg, max_pixels=img.shape[0] * img.shape[1] - 1)
    assert decode_compressed("jpeg", jpg, max_pixels=img.shape[0] * img.shape[1]).shape == img.shape


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["jpeg", "png", "bgr8; jpeg compressed bgr8", "16UC1; compressedDepth png",
                            "32FC1; compressedDepth png", "16UC1; png compressed", "weird"]),
       data=st.one_of(st.binary(max_size=600),
                      st.builds(lambda p, b: b"\x89PNG\r\n\x1a\n" + p + b, st.binary(max_size=40), st.binary(max_size=200)),
                      st.builds(lambda b: b"\xff\xd8" + b, st.binary(max_size=300))))
def test_decode_compressed_any_bytes(fmt, data):
    try:
        out = decode_compressed(fmt, data, max_pixels=10 ** 6)
    except ImageDecodeError:
        return
    assert out.ndim in (2, 3) and out.size > 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 16), n=st.integers(1, 30), fmt=st.sampled_from(["png", "jpeg"]))
def test_decode_compressed_corrupted_real_stream(seed, n, fmt):
    """Random byte flips / truncation of a valid stream: a result of the right kind or ImageDecodeError."""
    rng = np.random.default_rng(seed)
    buf = bytearray(encode_compressed(_smooth_rgb(), fmt))
    for i in rng.integers(0, len(buf), n):
        buf[i] = int(rng.integers(0, 256))
    buf = bytes(buf[: int(rng.integers(1, len(buf) + 1))])
    try:
        out = decode_compressed(fmt, buf)
    except ImageDecodeError:
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


# ------------------------------------------------------------------------------ camera info

def test_validate_camera_info():
    K = [500.0, 0, 320, 0, 510.0, 240, 0, 0, 1]
    k = validate_camera_info(K, 640, 480)
    assert k.shape == (3, 3) and k.dtype == np.float64 and k[1, 1] == 510.0
    np.testing.assert_array_equal(validate_camera_info(np.array(K).reshape(3, 3), 640, 480), k)
    bad = {
        "all zeros": [0.0] * 9,
        "zero or negative focal": [0.0, 0, 320, 0, 500, 240, 0, 0, 1],
        "non-finite": [np.nan, 0, 320, 0, 500, 240, 0, 0, 1],
        "9 values": [500.0, 0, 320, 0, 500, 240],
        "upper-triangular": [500.0, 0, 320, 0, 500, 240, 0, 1, 1],
        "outside the": [500.0, 0, 900, 0, 500, 240, 0, 0, 1],
    }
    for match, k in bad.items():
        with pytest.raises(ImageDecodeError, match=match):
            validate_camera_info(k, 640, 480)
    with pytest.raises(ImageDecodeError, match="negative focal"):
        validate_camera_info([500.0, 0, 320, 0, -500, 240, 0, 0, 1], 640, 480)
    with pytest.raises(ImageDecodeError, match="image size"):
        validate_camera_info(K, 0, 480)
    with pytest.raises(ImageDecodeError, match="not numeric"):
        validate_camera_info(["a"] * 9, 640, 480)
