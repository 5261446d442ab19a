import time

import pytest
import torch

import storage
from storage.loaders import ResidentLoader, local_shuffle


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return storage.prepare_dataset("synthetic", str(tmp_path_factory.mktemp("d")), seed=0, n_train=1000, n_val=300,
                                   rows_per_shard=250)


def _batches(loader, epoch):
    return list(loader.epoch(epoch))


def test_resident_seeded_epochs_and_drop_last(synth):
    a = storage.make_loader(synth.uri, "train", batch_size=64, seed=7, mode="resident")
    b = storage.make_loader(synth.uri, "train", batch_size=64, seed=7, mode="resident")
    c = storage.make_loader(synth.uri, "train", batch_size=64, seed=8, mode="resident")
    assert isinstance(a, ResidentLoader) and a.steps_per_epoch == 15 == len(_batches(a, 0))
    e0, e0b, e1, f0 = _batches(a, 0), _batches(b, 0), _batches(a, 1), _batches(c, 0)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(e0, e0b))
    assert not torch.equal(e0[0][1], e1[0][1]) and not torch.equal(e0[0][1], f0[0][1])
    x, y = e0[0]
    assert x.dtype == torch.uint8 and x.shape == (64, 3, 32, 32) and y.dtype == torch.int64
    labels = torch.cat([bt[1] for bt in e0])
    assert len(labels) == 960 and a.images_per_sec > 0
    # within an epoch no sample repeats: compare image bytes
    flat = torch.cat([bt[0] for bt in e0]).reshape(960, -1)
    assert len({bytes(r.numpy()) for r in flat}) == 960


def test_val_keeps_last_partial_batch(synth):
    v = storage.make_loader(synth.uri, "val", batch_size=128, seed=0, shuffle=False, drop_last=False)
    bs = _batches(v, 0)
    assert v.steps_per_epoch == 3 and [len(b[1]) for b in bs] == [128, 128, 44]
    x, y = storage.open_dataset(synth.uri).load_split("val")
    assert torch.equal(torch.cat([b[0] for b in bs]), x) and torch.equal(torch.cat([b[1] for b in bs]), y)


def test_rank_sharding_matches_single_rank(synth):
    one = _batches(storage.make_loader(synth.uri, "train", batch_size=64, seed=3), 2)
    ranks = [_batches(storage.make_loader(synth.uri, "train", batch_size=64, seed=3, rank=r, world_size=2), 2)
             for r in range(2)]
    assert len(ranks[0]) == len(one)
    for step, (x, y) in enumerate(one):
        assert ranks[0][step][0].shape[0] == 32
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), x)
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), y)


def test_loader_argument_errors(synth):
    with pytest.raises(ValueError, match="multiple of world_size"):
        storage.make_loader(synth.uri, "train", batch_size=63, seed=0, world_size=2, rank=0)
    with pytest.raises(ValueError, match="drop_last"):
        storage.make_loader(synth.uri, "val", batch_size=512, seed=0)
    with pytest.raises(ValueError, match="rank"):
        storage.make_loader(synth.uri, "train", batch_size=64, seed=0, world_size=2, rank=2)
    with pytest.raises(ValueError, match="mode"):
        storage.make_loader(synth.uri, "train", batch_size=64, seed=0, mode="gpu")
    with pytest.raises(storage.StorageError, match="no split 'test'"):
        storage.make_loader(synth.uri, "test", batch_size=64, seed=0)


def test_auto_mode_picks_by_size(synth, ray_cluster):
    small = storage.make_loader(synth.uri, "train", batch_size=64, seed=0)
    big = storage.make_loader(synth.uri, "train", batch_size=64, seed=0, max_resident_bytes=1000 * 3072 - 1)
    assert type(small).__name__ == "ResidentLoader" and type(big).__name__ == "StreamingLoader"


def _multiset(batches):
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return sorted(zip([bytes(r.numpy()) for r in x.reshape(len(x), -1)], y.tolist()))


def test_streaming_matches_resident_multiset(synth, ray_cluster):
    kw = dict(batch_size=100, seed=5, shuffle=True, drop_last=False)
    res = storage.make_loader(synth.uri, "train", mode="resident", **kw)
    st = storage.make_loader(synth.uri, "train", mode="streaming", **kw)
    assert st.steps_per_epoch == res.steps_per_epoch == 10
    s0 = _batches(st, 0)
    assert _multiset(s0) == _multiset(_batches(res, 0))  # every sample exactly once, pixels and labels intact
    assert s0[0][0].dtype == torch.uint8 and s0[0][0].shape == (100, 3, 32, 32) and st.images_per_sec > 0
    again, other = _batches(st, 0), _batches(st, 1)
    assert torch.equal(again[0][1], s0[0][1]) and torch.equal(again[3][0], s0[3][0])  # same seed, same order
    assert not torch.equal(torch.cat([b[1] for b in other]), torch.cat([b[1] for b in s0]))
    # two ranks of the streaming loader split each global batch the same way as the resident rule
    halves = [storage.make_loader(synth.uri, "train", mode="streaming", rank=r, world_size=2, **kw)
              for r in range(2)]
    h = [_batches(x, 0) for x in halves]
    assert torch.equal(torch.cat([h[0][0][0], h[1][0][0]]), s0[0][0])


@pytest.mark.parametrize("drop_last", [True, False])
def test_local_shuffle_is_a_seeded_permutation_that_keeps_images_with_labels(drop_last):
    # Input batches of uneven sizes, as a stream's last batch or a resized block would be.
    bounds = [0, 5, 30, 31, 70, 100]
    stream = [(torch.arange(a, b).view(-1, 1, 1).expand(-1, 3, 2).clone(), torch.arange(a, b))
              for a, b in zip(bounds[:-1], bounds[1:])]
    out = list(local_shuffle(iter(stream), 16, 40, seed=7, drop_last=drop_last))
    sizes = [len(y) for _, y in out]
    assert sizes == [16] * 6 + ([] if drop_last else [4])
    ys = torch.cat([y for _, y in out])
    assert all(torch.equal(x[:, 0, 0], y) and x.shape[1:] == (3, 2) for x, y in out)  # rows stay whole, paired
    assert len(set(ys.tolist())) == len(ys) and (drop_last or sorted(ys.tolist()) == list(range(100)))
    assert ys.tolist() != sorted(ys.tolist())
    assert ys[:16].max() < 70  # local: the first batch is drawn once 40 rows are held, from what came by then
    again = torch.cat([y for _, y in local_shuffle(iter(stream), 16, 40, seed=7, drop_last=drop_last)])
    other = torch.cat([y for _, y in local_shuffle(iter(stream), 16, 40, seed=8, drop_last=drop_last)])
    assert torch.equal(again, ys) and not torch.equal(other, ys)


def test_synthetic_is_learnable_by_a_small_cnn(tmp_path):
    # one intra-op thread: these tiny convs gain nothing from more, and on a busy 2-core box they stall
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _learn(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _learn(tmp_path):
    torch.manual_seed(0)
    m = storage.prepare_dataset("synthetic", str(tmp_path), seed=0, n_train=5000, n_val=1000)
    loader = storage.make_loader(m.uri, "train", batch_size=64, seed=0)
    xv, yv = storage.open_dataset(m.uri).load_split("val")
    norm = lambda x: (x.float() / 255 - 0.5) / 0.25
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    t, steps, epoch = time.perf_counter(), 0, 0

    def accuracy():
        with torch.no_grad():
            return (net(norm(xv)).argmax(1) == yv).float().mean().item()

    first = None
    while steps < 500:
        for x, y in loader.epoch(epoch):
            loss = torch.nn.functional.cross_entropy(net(norm(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == 20:
                first = accuracy()
            if steps == 500:
                break
        epoch += 1
    acc = accuracy()
    # seen: ~0.10 after 20 steps, ~0.75 after 500 steps (10 classes, chance 0.10)
    assert first < 0.3, f"too easy: {first:.2f} after 20 steps"
    assert acc > 0.5, f"val accuracy {acc:.3f} after 500 steps"
    print(f"synthetic learnability: {first:.3f} -> {acc:.3f} in {time.perf_counter() - t:.1f}s")


def _piece_rows(ss, pieces) -> list[int]:
    """Indices into load_split's rows (shards in manifest order) of what the pieces read."""
    offset, at = {}, 0
    for p, info in zip(ss.shard_paths("train"), ss.manifest.shards["train"]):
        offset[p], at = at, at + info["rows"]
    return [offset[p["path"]] + i for p in pieces for a, b in p["ranges"] for i in range(a, b)]


def test_epoch_pieces_give_ranks_equal_disjoint_shares_that_move_every_epoch(synth):
    ss = storage.open_dataset(synth.uri)
    shares = {(e, r): storage.loaders.epoch_pieces(ss, "train", seed=4, epochs=range(e, e + 1), rank=r,
                                                   world_size=3) for e in range(3) for r in range(3)}
    for e in range(3):
        rows = [_piece_rows(ss, shares[e, r]) for r in range(3)]
        assert [len(r) for r in rows] == [333] * 3  # 1000 // 3 each
        assert len(set(rows[0]) | set(rows[1]) | set(rows[2])) == 999  # disjoint
        for r in range(3):  # a shard is read at most once per rank and epoch, even when its share wraps round
            assert len({p["path"] for p in shares[e, r]}) == len(shares[e, r])
    assert set(_piece_rows(ss, shares[0, 0])) != set(_piece_rows(ss, shares[1, 0]))
    whole = storage.loaders.epoch_pieces(ss, "train", seed=4, epochs=range(1), rank=0, world_size=1)
    assert len(whole) == 4 and sorted(_piece_rows(ss, whole)) == list(range(1000))  # wrapped: 2 ranges, 1 read
    # a run's epochs in one list are the same as each epoch asked for alone (a resumed run's pieces)
    assert storage.loaders.epoch_pieces(ss, "train", seed=4, epochs=range(3), rank=1, world_size=3) == \
        shares[0, 1] + shares[1, 1] + shares[2, 1]
    with pytest.raises(ValueError, match="does not fit"):
        storage.loaders.epoch_pieces(ss, "train", seed=4, epochs=range(1), rank=0, world_size=2, rows_per_rank=501)
    with pytest.raises(ValueError, match="500 per rank over 2: not one batch of 600 per epoch; lower the batch"):
        storage.EpochStream(synth.uri, "train", batch_size=600, seed=0, epochs=1, world_size=2)


@pytest.mark.ray
def test_epoch_stream_epochs_are_exact_and_resume_anywhere(synth, ray_cluster):
    ss = storage.open_dataset(synth.uri)
    x_all, y_all = ss.load_split("train")
    kw = dict(batch_size=64, seed=3, world_size=2)
    ranks = [storage.EpochStream(synth.uri, "train", epochs=3, rank=r, **kw) for r in range(2)]
    assert ranks[0].steps_per_epoch == 7  # 500 rows per rank, whole batches of 64
    out = {(r, e): _batches(ranks[r], e) for e in range(3) for r in range(2)}
    for (r, e), batches in out.items():
        assert [tuple(x.shape) for x, _ in batches] == [(64, 3, 32, 32)] * 7 and batches[0][0].dtype == torch.uint8
        want = _piece_rows(ss, storage.loaders.epoch_pieces(ss, "train", seed=3, epochs=range(e, e + 1), rank=r,
                                                            world_size=2, rows_per_rank=7 * 64))
        assert _multiset(batches) == _multiset([(x_all[want], y_all[want])])  # that epoch's rows, each once
    assert _multiset(out[0, 0]) != _multiset(out[0, 1])
    # an epoch past the planned ones (the stream is drained) is read afresh: its own rows, not a replay
    past = _piece_rows(ss, storage.loaders.epoch_pieces(ss, "train", seed=3, epochs=range(3, 4), rank=0,
                                                        world_size=2, rows_per_rank=7 * 64))
    assert _multiset(_batches(ranks[0], 3)) == _multiset([(x_all[past], y_all[past])])
    # a run resumed at epoch 1 (a new execution from there) gets the batches the uninterrupted run got
    resumed = storage.EpochStream(synth.uri, "train", epochs=3, rank=0, **kw)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(_batches(resumed, 1), out[0, 1]))
    # an epoch left half-way (a diverged run breaks out of it) does not shift the next one
    partial = storage.EpochStream(synth.uri, "train", epochs=3, rank=1, **kw)
    next(iter(partial.epoch(0)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(_batches(partial, 1), out[1, 1]))
    next(iter(partial.epoch(2)))
    partial.close()  # a run that ends mid-epoch stops the decoding; the loader still works if asked again
    assert all(torch.equal(a[1], b[1]) for a, b in zip(_batches(partial, 2), out[1, 2]))
