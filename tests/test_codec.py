"""The wire codec: tensors and plain values round-trip bit for bit; anything malformed is a CodecError."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.codec import DTYPE_NAMES, EXT_TENSOR, INLINE_MAX_BYTES, MAX_DIMS, CodecError
from protocol.tensors import ITEMSIZES, WireTensor

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ROOT = Path(__file__).resolve().parents[1]
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor, so NaN payloads and -0.0 compare exactly."""
    return tensor.reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)


def assert_same_tensor(got: object, want: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns for numeric dtypes (NaNs, infs, subnormals included); 0/1 for bool."""
    generator = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape, dtype=np.int64))
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (numel * itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return bits(tensor).numpy().tobytes()


def roundtrip(obj: object) -> object:
    """Encode, then decode with torch tensors rebuilt, as a node does."""
    return codec.decode(codec.encode(obj), torch_tensors=True)


def assert_same_wire_tensor(got: object, want: torch.Tensor) -> None:
    assert isinstance(got, WireTensor)
    assert got.dtype == str(want.dtype).removeprefix("torch.")
    assert got.shape == tuple(want.shape)
    assert got.data.tobytes() == raw_bytes(want)


def run_without_torch(code: str, stdin: bytes = b"") -> bytes:
    """Run ``code`` in a fresh interpreter that fails unless torch stays unimported; returns its stdout."""
    script = f"{code}\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], input=stdin, capture_output=True, env=env, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def tensor_ext(name: object, shape: object, ref: object) -> msgpack.ExtType:
    """A hand-made tensor extension, for specs that encode() would never produce."""
    return msgpack.ExtType(EXT_TENSOR, msgpack.packb([name, shape, ref], use_bin_type=True))


def header(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --- round trips ------------------------------------------------------------------------------


def test_the_allowed_dtypes_are_torch_dtypes_of_the_listed_item_sizes():
    assert set(DTYPE_NAMES) == set(ITEMSIZES)
    for name in DTYPE_NAMES:
        assert torch.empty((), dtype=getattr(torch, name)).element_size() == ITEMSIZES[name]


@pytest.mark.parametrize("name", sorted(DTYPE_NAMES))
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 4, 5), (600,)], ids=str)  # (600,) goes in a frame
def test_every_allowed_dtype_roundtrips_bitwise(name, shape):
    tensor = random_tensor(TORCH_DTYPES[name], shape, seed=len(shape))
    assert_same_tensor(roundtrip({"t": tensor})["t"], tensor)


@pytest.mark.parametrize("name", sorted(DTYPE_NAMES))
@pytest.mark.parametrize("shape", [(5,), (3, 7), (600,), (), (0, 3)], ids=str)
def test_tensors_decode_to_wire_tensors_unless_torch_tensors_are_asked_for(name, shape):
    tensor = random_tensor(TORCH_DTYPES[name], shape, seed=3)
    frames = codec.encode({"t": tensor})
    assert_same_wire_tensor(codec.decode(frames)["t"], tensor)
    assert_same_tensor(codec.decode(frames, torch_tensors=True)["t"], tensor)


def test_special_float_values_survive_exactly():
    values = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3.4e38]
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tensor = torch.tensor(values, dtype=dtype)
        assert_same_tensor(roundtrip(tensor), tensor)


def test_bool_roundtrips():
    tensor = torch.tensor([[True, False, True], [False, False, True]])
    got = roundtrip(tensor)
    assert got.dtype == torch.bool
    assert got.tolist() == tensor.tolist()


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.t(),  # transposed
        lambda t: t[:, ::3],  # column step
        lambda t: t[::2, 1::2],  # both
        lambda t: t.t()[5:],  # transposed with an offset
        lambda t: t.expand(3, -1, -1)[:, ::2],  # a zero stride
    ],
    ids=["transposed", "col-step", "row-col-step", "transposed-offset", "expanded"],
)
@pytest.mark.parametrize("rows", [4, 40], ids=["inline", "frame"])
def test_non_contiguous_tensors_roundtrip(make, rows):
    base = torch.arange(rows * 12, dtype=torch.float32).reshape(rows, 12)
    view = make(base)
    assert not view.is_contiguous()
    got = roundtrip(view)
    assert got.is_contiguous()
    assert_same_tensor(got, view)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(2, dtype=torch.bfloat16)[1::2],  # shape (1,), stride (2,)
        lambda: torch.arange(2, dtype=torch.float32).reshape(1, 2).t()[1:],  # shape (1, 1), strides (1, 2)
        lambda: torch.arange(6, dtype=torch.int64).reshape(3, 2)[::3, ::2],  # shape (1, 1), strides (6, 2)
    ],
    ids=["step", "transposed-slice", "step-and-slice"],
)
def test_single_element_views_with_odd_strides_roundtrip(make):
    """Contiguous by torch's rules (a size-1 dim's stride is free), but not stride 1 when flattened."""
    tensor = make()
    assert tensor.numel() == 1
    assert_same_tensor(roundtrip(tensor), tensor)


@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (0, 0), (1, 0)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_empty_tensors_roundtrip(shape, dtype):
    got = roundtrip(torch.empty(shape, dtype=dtype))
    assert got.shape == shape and got.dtype == dtype and got.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_zero_dim_tensors_roundtrip(dtype):
    tensor = torch.tensor(1, dtype=dtype)
    got = roundtrip(tensor)
    assert got.dim() == 0
    assert_same_tensor(got, tensor)


def test_small_tensor_is_inline_and_large_one_gets_its_own_frame():
    at_limit = torch.zeros(INLINE_MAX_BYTES // 4, dtype=torch.float32)
    over_limit = torch.zeros(INLINE_MAX_BYTES // 4 + 1, dtype=torch.float32)
    assert len(codec.encode({"t": at_limit})) == 1
    frames = codec.encode({"t": over_limit})
    assert len(frames) == 2
    assert memoryview(frames[1]).nbytes == over_limit.numel() * 4
    assert len(frames[0]) < 100  # the header holds a frame index, not the bytes


def test_large_contiguous_tensor_is_not_copied_into_its_frame():
    tensor = torch.arange(1000, dtype=torch.float32)
    frames = codec.encode(tensor)
    assert np.frombuffer(frames[1], dtype=np.uint8).ctypes.data == tensor.data_ptr()


def test_every_large_tensor_gets_its_own_frame_in_order():
    a, b, c = (random_tensor(torch.float32, (300,), seed=i) for i in range(3))
    small = torch.ones(3)
    obj = {"a": a, "nested": [small, {"b": b}], "c": c}
    frames = codec.encode(obj)
    assert len(frames) == 4
    for torch_tensors, check in ((True, assert_same_tensor), (False, assert_same_wire_tensor)):
        got = codec.decode(frames, torch_tensors=torch_tensors)
        check(got["a"], a)
        check(got["nested"][0], small)
        check(got["nested"][1]["b"], b)
        check(got["c"], c)


def test_decoded_tensor_shares_memory_with_its_frame():
    tensor = torch.arange(1000, dtype=torch.int32)
    frames = codec.encode(tensor)
    buffer = bytearray(frames[1])
    as_torch = codec.decode([frames[0], buffer], torch_tensors=True)
    as_wire = codec.decode([frames[0], buffer])
    buffer[0] = 0xFF
    assert as_torch[0].item() == 0xFF
    assert as_wire.data[0] == 0xFF


@pytest.mark.parametrize("as_frame", [bytes, memoryview, bytearray], ids=["bytes", "memoryview", "bytearray"])
def test_decode_accepts_any_buffer(as_frame):
    tensor = random_tensor(torch.bfloat16, (40, 40))
    frames = [as_frame(bytes(frame)) for frame in codec.encode({"x": tensor, "y": torch.ones(2)})]
    got = codec.decode(frames, torch_tensors=True)
    assert_same_tensor(got["x"], tensor)
    assert_same_tensor(got["y"], torch.ones(2))


@pytest.fixture
def pair():
    ctx = zmq.Context()
    address = f"inproc://codec-{uuid.uuid4().hex}"
    send, recv = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    send.bind(address)
    recv.connect(address)
    yield send, recv
    send.close(linger=0)
    recv.close(linger=0)
    ctx.term()


def test_decode_zmq_frames_received_without_copy(pair):
    send, recv = pair
    large = random_tensor(torch.float16, (64, 33), seed=3)
    small = random_tensor(torch.int8, (5,), seed=4)
    obj = {"large": large, "small": small, "meta": {"id": "x", "n": [1, 2.5, None, b"raw"]}}
    send.send_multipart(codec.encode(obj), copy=False)
    frames = recv.recv_multipart(copy=False)
    assert len(frames) == 2 and all(isinstance(frame, zmq.Frame) for frame in frames)
    assert_same_wire_tensor(codec.decode(frames)["large"], large)
    got = codec.decode(frames, torch_tensors=True)
    assert_same_tensor(got["large"], large)
    assert_same_tensor(got["small"], small)
    assert got["meta"] == {"id": "x", "n": [1, 2.5, None, b"raw"]}


def test_nested_structures_with_tensors_roundtrip():
    embeds = random_tensor(torch.bfloat16, (1, 77, 32), seed=1)
    mask = torch.tensor([[True, False]])
    obj = {
        "request": {"prompt": "a cat", "steps": None, "guidance": 7.5, "seed": 2**63 - 1},
        "embeds": {"prompt_embeds": embeds, "masks": [mask, mask.t()]},
        "list": [[torch.tensor(3)], [], {}],
        "blob": b"\x00\xff",
        "flag": False,
    }
    got = roundtrip(obj)
    assert got["request"] == obj["request"]
    assert_same_tensor(got["embeds"]["prompt_embeds"], embeds)
    assert_same_tensor(got["embeds"]["masks"][0], mask)
    assert_same_tensor(got["embeds"]["masks"][1], mask.t())
    assert_same_tensor(got["list"][0][0], torch.tensor(3))
    assert got["list"][1:] == [[], {}]
    assert got["blob"] == b"\x00\xff" and got["flag"] is False


def test_numpy_arrays_travel_as_tensors():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert_same_tensor(roundtrip(array), torch.from_numpy(array))


def test_tensor_requiring_grad_is_encoded_detached():
    tensor = torch.randn(3, requires_grad=True)
    assert_same_tensor(roundtrip(tensor * 2), (tensor * 2).detach())


# --- WireTensor: what the broker holds and forwards ---------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4), (40, 40)], ids=["inline", "frame"])
def test_a_decoded_wire_tensor_re_encodes_to_the_same_frames(shape):
    tensor = random_tensor(torch.bfloat16, shape, seed=5)
    frames = [bytes(f) for f in codec.encode({"t": tensor, "n": 1})]
    again = codec.encode(codec.decode(frames))
    assert [bytes(f) for f in again] == frames


@pytest.mark.parametrize(
    ("dtype", "shape", "length"),
    [("float32", (2, 3), 23), ("float32", (2, 3), 25), ("int64", (), 4), ("bool", (0,), 1), ("bfloat16", (4,), 4)],
    ids=str,
)
def test_a_wire_tensor_refuses_bytes_that_do_not_fill_its_shape(dtype, shape, length):
    with pytest.raises(ValueError, match="bytes do not hold"):
        WireTensor(dtype, shape, memoryview(bytes(length)))


@pytest.mark.parametrize("name", ["float32", "bfloat16", "bool", "int64", "uint8"])
@pytest.mark.parametrize(
    ("shape", "start", "stop"),
    [
        ((5, 3), 0, 5),
        ((5, 3), 1, 2),
        ((5, 3), 4, 5),
        ((5, 3), 2, 2),
        ((300, 2), 100, 250),
        ((7,), 3, 6),
        ((4, 0), 1, 3),
    ],
    ids=str,
)
def test_wire_tensor_rows_equal_torch_slicing(name, shape, start, stop):
    tensor = random_tensor(TORCH_DTYPES[name], shape, seed=start + stop)
    wire = codec.decode(codec.encode(tensor))
    rows = wire.rows(start, stop)
    assert_same_wire_tensor(rows, tensor[start:stop])
    assert_same_tensor(rows.to_torch(), tensor[start:stop])
    # ... and the rows travel on as a tensor of their own.
    assert_same_tensor(roundtrip({"rows": rows})["rows"], tensor[start:stop])


def test_wire_tensor_rows_are_a_view_of_the_received_bytes():
    tensor = torch.arange(400, dtype=torch.int32).reshape(100, 4)
    frames = codec.encode(tensor)
    buffer = bytearray(frames[1])
    rows = codec.decode([frames[0], buffer]).rows(10, 12)
    buffer[10 * 16] = 0xAB  # the first byte of row 10
    assert rows.data[0] == 0xAB
    assert rows.to_torch()[0, 0].item() == 0xAB


@pytest.mark.parametrize(("start", "stop"), [(-1, 1), (2, 1), (0, 6), (6, 6)], ids=str)
def test_wire_tensor_rows_out_of_range_are_refused(start, stop):
    wire = codec.decode(codec.encode(torch.zeros(5, 2)))
    with pytest.raises(IndexError):
        wire.rows(start, stop)


def test_a_zero_dim_wire_tensor_has_no_rows():
    with pytest.raises(IndexError):
        codec.decode(codec.encode(torch.tensor(1.5))).rows(0, 1)


def test_decoding_a_message_with_tensors_imports_no_torch():
    frames = codec.encode({"kind": "x", "small": torch.arange(4, dtype=torch.int16), "large": torch.ones(3, 200)})
    stdin = msgpack.packb([bytes(f) for f in frames])
    code = """
import sys, msgpack
import protocol.messages, protocol.codec
from protocol.tensors import WireTensor
frames = msgpack.unpackb(sys.stdin.buffer.read())
body = protocol.codec.decode(frames)
assert isinstance(body["small"], WireTensor) and body["small"].shape == (4,) and body["small"].dtype == "int16"
assert isinstance(body["large"], WireTensor) and body["large"].shape == (3, 200)
sys.stdout.buffer.write(msgpack.packb([bytes(f) for f in protocol.codec.encode(body)]))
"""
    assert msgpack.unpackb(run_without_torch(code, stdin)) == msgpack.unpackb(stdin)


def test_wire_tensor_rows_are_sliced_and_re_encoded_without_torch():
    latents = random_tensor(torch.float32, (3, 4, 8, 8), seed=11)  # (num_images, C, h, w), in its own frame
    stdin = msgpack.packb([bytes(f) for f in codec.encode(latents)])
    code = """
import sys, msgpack
import protocol.codec
frames = msgpack.unpackb(sys.stdin.buffer.read())
rows = [protocol.codec.decode(frames).rows(i, i + 1) for i in range(3)]
sys.stdout.buffer.write(msgpack.packb([[bytes(f) for f in protocol.codec.encode(row)] for row in rows]))
"""
    for i, frames in enumerate(msgpack.unpackb(run_without_torch(code, stdin))):
        assert_same_tensor(codec.decode(frames, torch_tensors=True), latents[i : i + 1])


# --- encoding refusals ------------------------------------------------------------------------


class Custom:
    pass


@pytest.mark.parametrize(
    "value",
    [{1, 2}, Custom(), object(), 1 + 2j, torch.float32, 2**64],
    ids=["set", "custom-class", "object", "complex", "dtype", "int-too-big"],
)
def test_encode_refuses_values_msgpack_cannot_carry(value):
    with pytest.raises(CodecError):
        codec.encode({"payload": [value]})


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.uint16, torch.float8_e4m3fn])
def test_encode_refuses_dtypes_off_the_allow_list(dtype):
    with pytest.raises(CodecError, match="not allowed"):
        codec.encode({"t": torch.zeros(4, dtype=dtype)})


def test_encode_refuses_complex_numpy_arrays():
    with pytest.raises(CodecError):
        codec.encode(np.zeros(3, dtype=np.complex64))


def test_encode_refuses_tensors_off_the_cpu():
    with pytest.raises(CodecError, match="CPU"):
        codec.encode(torch.zeros(4, device="meta"))


# --- decoding refusals ------------------------------------------------------------------------


def test_valid_hand_made_message_decodes():
    """The hand-made helpers produce what decode() accepts, so the refusals below test one thing each."""
    data = np.arange(6, dtype=np.float32).tobytes()
    frames = [header({"a": tensor_ext("float32", [2, 3], data), "b": tensor_ext("float32", [2, 3], 1)}), data]
    got = codec.decode(frames)
    assert got["a"] == got["b"] == WireTensor("float32", (2, 3), memoryview(data))
    assert got["a"].to_torch().tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("name", ["complex64", "float128", "object", "Float32", "", 5, None, b"float32"])
def test_decode_refuses_unknown_dtype(name):
    with pytest.raises(CodecError):
        codec.decode([header(tensor_ext(name, [1], b"\x00" * 4))])


@pytest.mark.parametrize("length", [0, 23, 25, 48], ids=["empty", "short-by-one", "long-by-one", "double"])
@pytest.mark.parametrize("inline", [True, False], ids=["inline", "frame"])
def test_decode_refuses_byte_length_not_matching_shape(length, inline):
    data = b"\x01" * length  # shape (2, 3) of float32 needs 24 bytes
    frames = (
        [header(tensor_ext("float32", [2, 3], data))] if inline else [header(tensor_ext("float32", [2, 3], 1)), data]
    )
    with pytest.raises(CodecError, match="byte length"):
        codec.decode(frames)


def test_decode_refuses_data_for_an_empty_shape():
    with pytest.raises(CodecError):
        codec.decode([header(tensor_ext("int8", [3, 0], b"\x00"))])


@pytest.mark.parametrize("code", [0, 2, 42, 127])
def test_decode_refuses_unknown_extension_type(code):
    with pytest.raises(CodecError, match="extension"):
        codec.decode([header({"x": msgpack.ExtType(code, b"\x93\xa7float32\x91\x01\xc4\x04\x00\x00\x00\x00")})])


def test_decode_refuses_msgpack_timestamps():
    """Timestamps are msgpack extension -1, which msgpack decodes itself: it is not a tensor."""
    with pytest.raises(CodecError):
        codec.decode([header({"when": msgpack.Timestamp(1, 0)})])


@pytest.mark.parametrize("ref", [0, 2, 99, -1], ids=["zero", "past-end", "far", "negative"])
def test_decode_refuses_frame_index_out_of_range(ref):
    data = b"\x00" * 8
    with pytest.raises(CodecError, match="frame index"):
        codec.decode([header(tensor_ext("float64", [1], ref)), data])


def test_decode_refuses_a_frame_used_twice():
    data = b"\x00" * 8
    frames = [header([tensor_ext("float64", [1], 1), tensor_ext("float64", [1], 1)]), data]
    with pytest.raises(CodecError, match="used twice"):
        codec.decode(frames)


def test_decode_refuses_unreferenced_frames():
    frames = [bytes(f) for f in codec.encode({"t": torch.zeros(1000)})]
    with pytest.raises(CodecError, match="not referenced"):
        codec.decode([*frames, b"extra"])
    with pytest.raises(CodecError, match="not referenced"):
        codec.decode([header({"a": 1}), b""])


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", b"\x92\x01", b"\xdb\xff\xff\xff\xff", b"\x81\x01\x02", "not bytes", 12345, None],
    ids=["empty", "never-used-byte", "truncated-array", "huge-str-length", "int-map-key", "str", "int", "none"],
)
def test_decode_refuses_garbage(frame):
    with pytest.raises(CodecError):
        codec.decode([frame])


def test_decode_refuses_no_frames():
    with pytest.raises(CodecError):
        codec.decode([])


def test_decode_refuses_trailing_bytes_after_the_document():
    with pytest.raises(CodecError):
        codec.decode([header({"a": 1}) + b"\x01"])


@pytest.mark.parametrize(
    "shape",
    [[-1], [2, -3], [1.0], ["2"], [True], [None], [[2]], 4, "4", None, {"0": 1}],
    ids=str,
)
def test_decode_refuses_bad_shape_entries(shape):
    # Refused by the shape check (or the spec's size bound before it), not by a later one.
    with pytest.raises(CodecError, match=r"^(tensor shape|malformed tensor spec)"):
        codec.decode([header(tensor_ext("uint8", shape, b"\x00"))])


def test_decode_refuses_too_many_dims():
    ok = [1] * MAX_DIMS
    assert codec.decode([header(tensor_ext("uint8", ok, b"\x07"))]).shape == tuple(ok)
    with pytest.raises(CodecError, match=r"^tensor shape"):
        codec.decode([header(tensor_ext("uint8", [1] * (MAX_DIMS + 1), b"\x07"))])


@pytest.mark.parametrize("torch_tensors", [False, True], ids=["wire", "torch"])
@pytest.mark.parametrize(
    "shape",
    [[2**20, 2**20, 2**20], [0, 2**62, 2**62], [0, 2**64 - 1], [0, 2**32, 2**32], [0, 2**31, 2**31, 2**31]],
    ids=str,
)
def test_decode_refuses_absurd_sizes_without_allocating(shape, torch_tensors):
    """No elements at all, or too many: either way no tensor can have these dimensions."""
    with pytest.raises(CodecError):
        codec.decode([header(tensor_ext("float32", shape, 1)), b""], torch_tensors=torch_tensors)


@pytest.mark.parametrize(
    "spec",
    [["float32", [1]], ["float32", [1], b"\x00" * 4, "extra"], {"dtype": "float32"}, "float32", None],
    ids=["two-items", "four-items", "map", "str", "nil"],
)
def test_decode_refuses_malformed_spec(spec):
    ext = msgpack.ExtType(EXT_TENSOR, msgpack.packb(spec, use_bin_type=True))
    with pytest.raises(CodecError):
        codec.decode([header(ext)])


@pytest.mark.parametrize("ref", ["\x00\x00\x00\x00", True, 1.0, None, [1]], ids=["str", "bool", "float", "nil", "list"])
def test_decode_refuses_data_that_is_neither_bytes_nor_index(ref):
    with pytest.raises(CodecError, match="bytes or a frame index"):
        codec.decode([header(tensor_ext("float32", [1], ref)), b"\x00" * 4])


def test_decode_refuses_a_spec_that_is_not_msgpack():
    with pytest.raises(CodecError, match="spec"):
        codec.decode([header(msgpack.ExtType(EXT_TENSOR, b"\xc1\xc1"))])


# --- properties -------------------------------------------------------------------------------


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = TORCH_DTYPES[draw(st.sampled_from(sorted(DTYPE_NAMES)))]
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
    if draw(st.booleans()):  # a size that needs its own frame
        shape = (*shape[:1], draw(st.integers(100, 700)))
    tensor = random_tensor(dtype, shape, seed=draw(st.integers(0, 2**32)))
    layout = draw(st.sampled_from(["contiguous", "transposed", "stepped"]))
    if layout == "transposed" and tensor.dim() >= 2:
        tensor = tensor.transpose(0, -1)
    elif layout == "stepped" and tensor.dim() >= 1:
        tensor = tensor[:: draw(st.integers(1, 3))]
    return tensor


@FAST
@given(tensors())
def test_property_random_tensors_roundtrip_exactly(tensor):
    frames = codec.encode({"t": tensor})
    assert len(frames) == (1 if tensor.numel() * tensor.element_size() <= INLINE_MAX_BYTES else 2)
    assert_same_tensor(codec.decode(frames, torch_tensors=True)["t"], tensor)
    wire = codec.decode(frames)["t"]
    assert_same_wire_tensor(wire, tensor)
    assert [bytes(f) for f in codec.encode({"t": wire})] == [bytes(f) for f in frames]  # forwarded as received


def _valid_message() -> list[bytes]:
    obj = {
        "small": torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32),
        "flags": torch.tensor([True, False]),
        "large": random_tensor(torch.bfloat16, (2, 300), seed=7),
        "meta": {"id": "r1", "seeds": [1, 2, 3], "scale": 0.5, "raw": b"xy", "none": None},
    }
    return [bytes(frame) for frame in codec.encode(obj)]


@st.composite
def mutated_frames(draw) -> list[bytes | bytearray]:
    frames: list[bytes | bytearray] = [bytearray(frame) for frame in _valid_message()]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "flip", "truncate", "insert", "drop_frame", "add_frame", "swap_frames"]))
        index = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "drop_frame" and frames:
            del frames[index]
        elif op == "add_frame":
            frames.insert(draw(st.integers(0, len(frames))), bytearray(draw(st.binary(max_size=16))))
        elif op == "swap_frames" and len(frames) >= 2:
            frames[0], frames[-1] = frames[-1], frames[0]
        elif frames and frames[index]:
            frame = frames[index]
            at = draw(st.integers(0, len(frame) - 1))
            if op == "set":
                frame[at] = draw(st.integers(0, 255))
            elif op == "flip":
                frame[at] ^= 1 << draw(st.integers(0, 7))
            elif op == "truncate":
                del frame[at:]
            else:
                frame[at:at] = draw(st.binary(min_size=1, max_size=8))
    return frames


@FAST
@given(mutated_frames())
def test_property_mutated_messages_decode_or_raise_codec_error(frames):
    for torch_tensors in (False, True):
        with contextlib.suppress(CodecError):  # anything else fails the test
            codec.decode(frames, torch_tensors=torch_tensors)


@FAST
@given(st.binary(max_size=64), st.lists(st.binary(max_size=8), max_size=3))
def test_property_random_bytes_decode_or_raise_codec_error(first, rest):
    with contextlib.suppress(CodecError):  # anything else fails the test
        codec.decode([first, *rest])


# --- work per message -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bomb",
    [
        msgpack.packb([[[] for _ in range(65535)] for _ in range(64)]),  # four million empty arrays
        msgpack.packb([list(range(65535)) for _ in range(64)]),  # four million small integers
        b"\x91" * 4_000_000,  # four million arrays, each inside the one before
    ],
    ids=["nested-empty-arrays", "flat-integers", "deep"],
)
def test_a_4mb_bomb_costs_the_broker_under_50ms_to_refuse(bomb):
    import time

    from protocol import messages

    def refuse() -> float:  # what the broker runs on a frame: decode it, then look for a job to fail
        started = time.perf_counter()
        with pytest.raises(CodecError, match="refused before decoding"):
            messages.from_frames([bomb])
        assert messages.job_of([bomb]) is None
        return time.perf_counter() - started

    assert len(bomb) >= 4_000_000
    assert min(refuse() for _ in range(3)) < 0.05


def test_a_document_within_the_budget_decodes():
    from protocol.budget import MAX_OBJECTS

    values = [[i, str(i), None] for i in range((MAX_OBJECTS - 2) // 4)]  # 1 + 4 per item, under the bound
    assert codec.decode([msgpack.packb({"values": values})]) == {"values": values}
    with pytest.raises(CodecError, match="more than"):
        codec.decode([msgpack.packb({"values": [*values, [0, "", None]] * 2})])
