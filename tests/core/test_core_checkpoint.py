"""Checkpoint files: safetensors (single and sharded), pytorch_model.bin, the restricted unpickler.

torch is used only to *write* ``.bin`` files the way users have them; reading never needs it.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch  # only writes .bin files the way users have them

from nezha_zoo.io.errors import CheckpointError
from nezha_zoo.io.reader import open_checkpoint
from nezha_zoo.io.shards import (
    PT_WEIGHTS_INDEX_NAME,
    PT_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    parse_size,
)
from nezha_zoo.io.torch_pickle import UnsafePickleError, load_torch_file
from nezha_zoo.io.writer import save_state_dict


def _tensors(n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {f"layer.{i}.weight": rng.standard_normal((8, 4 + i)).astype(np.float32) for i in range(n)}
    out["scalar"] = np.array(1.5, dtype=np.float32)
    out["ids"] = np.arange(5, dtype=np.int64)
    return out


def _read_all(path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as r:
        return {k: r.get(k) for k in r.keys()}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert a[k].tobytes() == b[k].tobytes(), k


# --- writing --------------------------------------------------------------------------------------


def test_save_single_file(tmp_path):
    t = _tensors()
    written = save_state_dict(tmp_path, t, extra_files={"config.json": "{}\n"})
    assert written == [SAFE_WEIGHTS_NAME, "config.json"]
    assert sorted(os.listdir(tmp_path)) == ["config.json", SAFE_WEIGHTS_NAME]
    with open_checkpoint(tmp_path) as r:
        assert r.format == "safetensors" and r.metadata["format"] == "pt"
        assert r.shape("scalar") == () and r.dtype("ids") == "I64" and r.dtype("scalar") == "F32"
        assert "layer.0.weight" in r and len(r) == len(t)
    _assert_same(_read_all(tmp_path), t)


def test_save_non_contiguous_and_scalar_keep_their_shapes(tmp_path):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_state_dict(tmp_path, {"t": base.T, "s": np.array(3.0, np.float32)})
    got = _read_all(tmp_path)
    np.testing.assert_array_equal(got["t"], base.T)
    assert got["s"].shape == () and float(got["s"]) == 3.0


def test_save_sharded_with_correct_index(tmp_path):
    t = _tensors()
    limit = 8 * 6 * 4 + 1  # a little over one 8x6 float32 tensor
    written = save_state_dict(tmp_path, t, max_shard_size=limit, metadata={"note": "x"})
    shards = [w for w in written if w.endswith(".safetensors")]
    assert len(shards) > 2 and SAFE_WEIGHTS_INDEX_NAME in written
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert sorted(index["weight_map"]) == sorted(t)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in t.values())
    from safetensors import safe_open

    for key, shard in index["weight_map"].items():
        with safe_open(str(tmp_path / shard), framework="np") as h:
            assert key in h.keys()
            assert h.metadata() == {"format": "pt", "note": "x"}
    for shard in shards:  # each shard respects the limit unless it holds one larger tensor
        with safe_open(str(tmp_path / shard), framework="np") as h:
            sizes = [h.get_tensor(k).nbytes for k in h.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1
    with open_checkpoint(tmp_path) as r:
        assert r.format == "safetensors-sharded"
    _assert_same(_read_all(tmp_path), t)
    assert not (tmp_path / SAFE_WEIGHTS_NAME).exists()


def test_resave_removes_stale_shards(tmp_path):
    t = _tensors()
    save_state_dict(tmp_path, t, max_shard_size=200)
    (tmp_path / "README.md").write_text("keep me")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    save_state_dict(tmp_path, {"a": np.ones(3, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["README.md", SAFE_WEIGHTS_NAME]
    save_state_dict(tmp_path, t, max_shard_size=600)
    first = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    save_state_dict(tmp_path, t, max_shard_size=250)
    second = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert not set(first) & set(second)  # different shard counts, old names all gone
    assert not (tmp_path / SAFE_WEIGHTS_NAME).exists()
    _assert_same(_read_all(tmp_path), t)


def test_failed_save_leaves_previous_files_intact(tmp_path, monkeypatch):
    import nezha_zoo.io.writer as writer

    old = _tensors(seed=1)
    save_state_dict(tmp_path, old, max_shard_size=300, extra_files={"config.json": '{"v": 1}\n'})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = writer.write_safetensors  # writes each shard file
    calls = []

    def failing(filename, items, metadata):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(filename, items, metadata)

    monkeypatch.setattr(writer, "write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(tmp_path, _tensors(seed=2), max_shard_size=300, extra_files={"config.json": '{"v": 2}\n'})
    assert len(calls) == 2
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before
    assert not [p for p in tmp_path.parent.iterdir() if p.name.endswith(".staging")]
    _assert_same(_read_all(tmp_path), old)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    assert parse_size("1.5kb") == 1500
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("lots")


# --- reading safetensors --------------------------------------------------------------------------


def test_read_bfloat16_safetensors(tmp_path):
    from safetensors.torch import save_file

    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) / 4
    save_file({"w": t, "b": torch.ones(3)}, str(tmp_path / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    with open_checkpoint(tmp_path) as r:
        assert r.dtype("w") == "BF16"
        w = r.get("w")
    assert w.dtype.name == "bfloat16" and w.shape == (2, 3) and w.flags.writeable
    np.testing.assert_array_equal(w.astype(np.float32), t.float().numpy())


@pytest.mark.parametrize("keep", [4, 20, -3])
def test_truncated_safetensors_raises_naming_file(tmp_path, keep):
    save_state_dict(tmp_path, _tensors())
    f = tmp_path / SAFE_WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=SAFE_WEIGHTS_NAME):
        open_checkpoint(tmp_path)


def test_corrupt_safetensors_header_raises_naming_file(tmp_path):
    (tmp_path / SAFE_WEIGHTS_NAME).write_bytes((16).to_bytes(8, "little") + b"{garbage garbage}")
    with pytest.raises(CheckpointError, match=SAFE_WEIGHTS_NAME):
        open_checkpoint(tmp_path)
    (tmp_path / SAFE_WEIGHTS_NAME).write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=SAFE_WEIGHTS_NAME):
        open_checkpoint(tmp_path / SAFE_WEIGHTS_NAME)


def test_missing_shard_referenced_by_index(tmp_path):
    save_state_dict(tmp_path, _tensors(), max_shard_size=200)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        open_checkpoint(tmp_path)


def test_index_that_lies_about_a_shard(tmp_path):
    save_state_dict(tmp_path, _tensors(), max_shard_size=200)
    index = json.loads((tmp_path / SAFE_WEIGHTS_INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"]["layer.0.weight"] = shards[-1]
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="layer.0.weight"):
        open_checkpoint(tmp_path)
    index["weight_map"] = {"x": "../elsewhere.safetensors"}
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="plain file name"):
        open_checkpoint(tmp_path)
    (tmp_path / SAFE_WEIGHTS_INDEX_NAME).write_text("{}")
    with pytest.raises(CheckpointError, match="shard index"):
        open_checkpoint(tmp_path)


def test_no_weights_in_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="config.json"):
        open_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "absent")
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="weights.h5"):
        open_checkpoint(tmp_path / "weights.h5")


def test_get_unknown_key(tmp_path):
    save_state_dict(tmp_path, {"a": np.zeros(2, np.float32)})
    with open_checkpoint(tmp_path) as r, pytest.raises(KeyError, match="nope"):
        r.get("nope")


# --- reading pytorch_model.bin --------------------------------------------------------------------


def test_read_pytorch_bin_state_dict(tmp_path):
    lin = torch.nn.Linear(3, 4)
    sd = lin.state_dict()  # an OrderedDict carrying _metadata, as users' files do
    sd["half"] = torch.arange(4, dtype=torch.float16)
    sd["bf16"] = (torch.arange(6, dtype=torch.float32) / 3).to(torch.bfloat16).reshape(2, 3)
    sd["ids"] = torch.arange(5)
    sd["flags"] = torch.tensor([True, False])
    sd["view"] = torch.arange(10.0)[2:7]
    sd["transposed"] = torch.arange(6.0).reshape(2, 3).t()
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["param"] = torch.nn.Parameter(torch.ones(2))
    torch.save(sd, tmp_path / PT_WEIGHTS_NAME)
    with open_checkpoint(tmp_path) as r:
        assert r.format == "pytorch-bin"
        assert r.dtype("bf16") == "BF16" and r.dtype("ids") == "I64" and r.shape("transposed") == (3, 2)
        got = {k: r.get(k) for k in r.keys()}
    assert list(got) == list(sd)
    for k, v in sd.items():
        want = v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        g = got[k].astype(np.float32) if k == "bf16" else got[k]
        assert g.shape == want.shape and (k == "bf16" or g.dtype == want.dtype), k
        np.testing.assert_array_equal(g, want)
    assert got["bf16"].dtype.name == "bfloat16"


def test_read_sharded_pytorch_bin(tmp_path):
    a = {"x.weight": torch.randn(3, 2), "x.bias": torch.randn(3)}
    b = {"y.weight": torch.randn(2, 2).to(torch.bfloat16)}
    torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(b, tmp_path / "pytorch_model-00002-of-00002.bin")
    weight_map = {
        **{k: "pytorch_model-00001-of-00002.bin" for k in a},
        **{k: "pytorch_model-00002-of-00002.bin" for k in b},
    }
    (tmp_path / PT_WEIGHTS_INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with open_checkpoint(tmp_path) as r:
        assert r.format == "pytorch-bin-sharded" and sorted(r.keys()) == sorted(weight_map)
        np.testing.assert_array_equal(r.get("x.weight"), a["x.weight"].numpy())
        np.testing.assert_array_equal(r.get("y.weight").astype(np.float32), b["y.weight"].float().numpy())
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00002.bin"):
        open_checkpoint(tmp_path)


class _Payload:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: {"w": torch.ones(2), "obj": _Payload()},
        lambda: {"w": torch.ones(2), "fn": os.getcwd},
        lambda: {"w": torch.ones(2), "cls": zipfile.ZipFile},
        lambda: {"w": torch.ones(2), "dev": torch.device("cpu")},
    ],
    ids=["instance", "function", "class", "torch-object"],
)
def test_restricted_unpickler_refuses_more_than_tensors(tmp_path, make):
    path = tmp_path / PT_WEIGHTS_NAME
    torch.save(make(), path)
    with pytest.raises(UnsafePickleError, match=PT_WEIGHTS_NAME):
        load_torch_file(path)
    with pytest.raises(UnsafePickleError):
        open_checkpoint(tmp_path)


def test_restricted_unpickler_refuses_non_state_dicts(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.bin")
    with pytest.raises(UnsafePickleError, match="state dict"):
        load_torch_file(tmp_path / "list.bin")
    torch.save({"nested": {"w": torch.ones(2)}}, tmp_path / "nested.bin")
    with pytest.raises(UnsafePickleError, match="nested"):
        load_torch_file(tmp_path / "nested.bin")


def test_restricted_unpickler_refuses_reduce_payload(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": torch.ones(1), "e": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(UnsafePickleError, match="system"):
        load_torch_file(tmp_path / "evil.bin")


def test_truncated_and_corrupt_bin_raise_naming_file(tmp_path):
    torch.save({"w": torch.ones(64, 64)}, tmp_path / "good.bin")
    data = (tmp_path / "good.bin").read_bytes()
    (tmp_path / PT_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=PT_WEIGHTS_NAME):
        open_checkpoint(tmp_path)
    (tmp_path / "garbage.bin").write_bytes(b"not a zip at all" * 10)
    with pytest.raises(ValueError, match="garbage.bin"):
        load_torch_file(tmp_path / "garbage.bin")
    # Flip bytes inside the pickle: the zip CRC (or the unpickler) catches it.
    i = data.index(b"data.pkl") + 60
    (tmp_path / "flipped.bin").write_bytes(data[:i] + bytes(b ^ 0xFF for b in data[i : i + 40]) + data[i + 40 :])
    with pytest.raises(ValueError, match="flipped.bin"):
        load_torch_file(tmp_path / "flipped.bin")


def test_bin_with_short_storage_raises_naming_file(tmp_path):
    torch.save({"w": torch.ones(16)}, tmp_path / "w.bin")
    src = zipfile.ZipFile(tmp_path / "w.bin")
    with zipfile.ZipFile(tmp_path / "short.bin", "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            payload = src.read(name)
            if name.endswith("/data/0"):
                payload = payload[:20]
            dst.writestr(name, payload)
    src.close()
    with pytest.raises(ValueError, match="short.bin.*truncated"):
        load_torch_file(tmp_path / "short.bin")


def test_saved_files_get_ordinary_permissions(tmp_path):
    # Staged and temporary files are private (0600) while written; the results must not stay so.
    from nezha_zoo import NezhaConfig

    mask = os.umask(0o022)
    os.umask(mask)
    save_state_dict(tmp_path / "w", {"a": np.ones(2, np.float32)}, max_shard_size=4, extra_files={"x.txt": "x"})
    save_state_dict(tmp_path / "w", {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}, max_shard_size=4)
    NezhaConfig().save_pretrained(tmp_path / "c")
    files = list((tmp_path / "w").iterdir()) + list((tmp_path / "c").iterdir())
    assert len(files) == 5
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f.name


def _handmade_bin(path, offset, size, stride, storage_elems=4):
    """A torch-format zip whose single tensor has the given (possibly hostile) geometry."""
    import collections
    import io
    import pickle

    class Storage:
        pass

    class Tensor:
        def __init__(self, storage):
            self.storage = storage

        def __reduce__(self):
            return (
                torch._utils._rebuild_tensor_v2,
                (self.storage, offset, size, stride, False, collections.OrderedDict()),
            )

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", torch.FloatStorage, "0", "cpu", storage_elems)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": Tensor(Storage())})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        z.writestr("archive/data/0", np.arange(storage_elems, dtype="<f4").tobytes())


def test_handmade_bin_reads_like_torch(tmp_path):
    _handmade_bin(tmp_path / "ok.bin", 1, (2,), (2,))
    np.testing.assert_array_equal(load_torch_file(tmp_path / "ok.bin")["w"], [1.0, 3.0])
    np.testing.assert_array_equal(torch.load(tmp_path / "ok.bin", weights_only=True)["w"].numpy(), [1.0, 3.0])


@pytest.mark.parametrize(
    "offset,size,stride,match",
    [
        (0, (4,), (-1,), "geometry"),  # a negative stride would read before the storage
        (-2, (2,), (1,), "geometry"),
        (0, (2, 2), (1,), "geometry"),
        (3, (2,), (1,), "overruns"),
        (0, (3,), (2,), "overruns"),
        (4, (), (), "overruns"),
    ],
)
def test_hostile_tensor_geometry_is_refused(tmp_path, offset, size, stride, match):
    path = tmp_path / "hostile.bin"
    _handmade_bin(path, offset, size, stride)
    with pytest.raises(ValueError, match=f"hostile.bin.*{match}"):
        load_torch_file(path)
