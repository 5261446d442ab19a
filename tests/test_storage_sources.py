"""The CIFAR reader trusts nothing in the folder: a pickle that names any callable but numpy's array rebuilders is
refused unrun, labels outside the class list are refused, and a batch in CIFAR's own format (Python 2 pickles
naming numpy.core.multiarray) still loads."""

import os
import pickle
import pickletools
import struct
from collections import OrderedDict

import numpy as np
import pytest

import storage
from storage import StorageError, sources


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes written as Python 2 str (SHORT_BINSTRING / BINSTRING), as Python 2's cPickle wrote the
    CIFAR files; Python 3's own protocol 2 wraps bytes in a call to _codecs.encode, which CIFAR never has."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
                   + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _cifar_pickle(obj) -> bytes:
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x (which the CIFAR files were written with) names its rebuilder numpy.core.multiarray
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")


def _cifar10(root, rng, labels=None) -> dict:
    """A cifar-10-batches-py folder in the real files' format: dicts of bytes keys -> bytes, lists, a uint8 array."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "batches.meta").write_bytes(_cifar_pickle({b"label_names": [f"c{i}".encode() for i in range(10)],
                                                    b"num_cases_per_batch": 4, b"num_vis": 3072}))
    out = {}
    for name in [*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        ys = list(labels) if labels is not None else rng.integers(0, 10, 4).tolist()
        (d / name).write_bytes(_cifar_pickle({b"batch_label": f"{name} of 6".encode(), b"labels": ys, b"data": data,
                                              b"filenames": [f"img_{i}.png".encode() for i in range(4)]}))
        out[name] = (data, ys)
    return out


def _globals(blob: bytes) -> set[str]:
    return {arg for op, arg, _ in pickletools.genops(blob) if op.name == "GLOBAL"}


def test_cifar_format_batch_loads(tmp_path):
    fake = _cifar10(tmp_path / "src", np.random.default_rng(0))
    blob = (tmp_path / "src/cifar-10-batches-py/data_batch_1").read_bytes()
    assert _globals(blob) == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}  # as CIFAR's
    m = storage.prepare_dataset("cifar10", str(tmp_path / "out"), path=str(tmp_path / "src"))
    x, y = storage.open_dataset(m.uri).load_split("train")
    want = np.concatenate([fake[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(x.numpy(), want) and y.tolist() == sum((fake[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert m.class_names == [f"c{i}" for i in range(10)]


class _Payload:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return self.call, (self.arg,)


@pytest.mark.parametrize("call", [os.system, eval], ids=["os.system", "builtins.eval"])
def test_cifar_batch_that_calls_a_global_is_refused_unrun(tmp_path, call):
    _cifar10(tmp_path / "src", np.random.default_rng(1))
    marker = tmp_path / "ran"
    code = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w').close()"
    bad = tmp_path / "src/cifar-10-batches-py/data_batch_3"
    bad.write_bytes(_cifar_pickle({b"data": _Payload(call, code), b"labels": [0]}))  # a CIFAR file but for one call
    with pytest.raises(StorageError) as e:
        storage.prepare_dataset("cifar10", str(tmp_path / "out"), path=str(tmp_path / "src"))
    msg = str(e.value)
    assert not marker.exists()  # the payload never ran
    assert "\n" not in msg and msg.startswith(f"{bad}: the pickle calls ") and "download=True" in msg, msg
    assert ("system" if call is os.system else "eval") in msg


def test_unpickler_allows_numpy_arrays_only(tmp_path):
    ok = tmp_path / "ok"
    ok.write_bytes(pickle.dumps({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2]}))
    assert sources._unpickle(str(ok))[b"data"].tolist() == [[0, 1, 2], [3, 4, 5]]  # numpy 2's own names pass
    for obj in ({b"data": np.float64(1.0)}, {b"data": OrderedDict()}, {b"x": pickle.PickleBuffer}):
        (tmp_path / "bad").write_bytes(pickle.dumps(obj, protocol=4))
        with pytest.raises(StorageError, match="the pickle calls .*which no CIFAR batch does"):
            sources._unpickle(str(tmp_path / "bad"))
    (tmp_path / "list").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(StorageError, match="holds a list, not a CIFAR batch"):
        sources._unpickle(str(tmp_path / "list"))


@pytest.mark.parametrize("labels, pattern", [([0, 1, 10, 2], r"labels span 0\.\.10, outside \[0, 10\)"),
                                             ([0, -1, 2, 3], r"labels span -1\.\.3"),
                                             ([0, 1, 2], r"3 labels for 4 images")])
def test_cifar_labels_outside_the_class_list_refused(tmp_path, labels, pattern):
    _cifar10(tmp_path / "src", np.random.default_rng(2), labels=labels)
    with pytest.raises(StorageError, match=pattern) as e:
        storage.prepare_dataset("cifar10", str(tmp_path / "out"), path=str(tmp_path / "src"))
    assert "data_batch_1" in str(e.value) and "re-download" in str(e.value) and "\n" not in str(e.value)
