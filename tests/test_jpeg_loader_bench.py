"""benchmarks/jpeg_loader.py --smoke runs end to end and prints its figures in the parseable form; the encoded
streaming path it measures spreads decode over several tasks and still yields the resident path's images in
the same order."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULT = re.compile(r"^RESULT jpeg_loader ratio=(\d+\.\d+) target>=1\.5$")
RATE = re.compile(r"^(Ray Data streaming|torchvision ImageFolder)[^:]*:\s+(\d+) images/s")


def test_smoke_prints_both_rates_and_the_result(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "jpeg_loader.py"), "--smoke",
                           "--root", str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    rates = {m[1]: int(m[2]) for m in map(RATE.match, out) if m}
    assert set(rates) == {"Ray Data streaming", "torchvision ImageFolder"}, proc.stdout
    assert all(r > 0 for r in rates.values()), rates
    assert RESULT.match(out[-1]), out[-1]
    assert float(RESULT.match(out[-1])[1]) > 0
    assert any(line.startswith("GPU batched decode") for line in out)  # measured, or said not to be


def test_encoded_streaming_decodes_in_parallel_in_order(tmp_path, ray_cluster, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import jpeg_loader  # its image generator

    import storage
    import storage.loaders

    jpeg_loader.generate(str(tmp_path / "images"), 40, (40, 64, 36, 56))
    m = storage.prepare_dataset("imagefolder", str(tmp_path / "shards"), path=str(tmp_path / "images"),
                                progress_every=0)
    assert len(m.shards["train"]) == 1
    monkeypatch.setattr(storage.loaders, "ENCODED_BLOCK_BYTES", 8 << 10)  # tiny JPEGs: several blocks per shard
    ds = storage.ray_dataset(m.uri, "train", 32)
    rows = ds.take_all()
    x, y = storage.open_dataset(m.uri).load_split("train", image_size=32)
    assert torch.equal(torch.from_numpy(np.stack([r["image"] for r in rows])), x.permute(0, 2, 3, 1))  # HWC rows
    assert [int(r["label"]) for r in rows] == y.tolist()
    tasks = int(re.search(r"MapBatches\(_decode_batch\): (\d+) tasks", ds.stats())[1])
    assert tasks > 1, ds.stats()


def test_shards_store_images_without_dictionary_and_jpegs_uncompressed(tmp_path, monkeypatch):
    # Every image is unique (a dictionary only costs), and JPEG bytes do not compress: a reader of these shards
    # pays for neither. Raw pixels keep zstd.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import jpeg_loader
    import pyarrow.parquet as pq

    import storage

    jpeg_loader.generate(str(tmp_path / "images"), 12, (40, 64, 36, 56))
    enc = storage.prepare_dataset("imagefolder", str(tmp_path / "e"), path=str(tmp_path / "images"), progress_every=0)
    raw = storage.prepare_dataset("synthetic", str(tmp_path / "r"), seed=0, n_train=20, n_val=5)
    for m, codec in ((enc, "UNCOMPRESSED"), (raw, "ZSTD")):
        ss = storage.open_dataset(m.uri)
        col = pq.ParquetFile(ss.fs.open_input_file(ss.shard_paths("train")[0])).metadata.row_group(0).column(0)
        assert col.path_in_schema == "image" and col.compression == codec and not col.has_dictionary_page
        assert len(ss.load_split("train", image_size=16)[1]) == m.splits["train"]  # and they read back
