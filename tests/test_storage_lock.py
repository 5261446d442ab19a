import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import pytest

import storage.leases as leases
import storage.lock as lock
from storage import StorageError, acquire_lock
from tests.s3_server import s3_bucket  # noqa: F401  (module fixture: moto S3 server on loopback)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Import storage.lock without storage/__init__ (which pulls in torch): the holder starts in well under a second.
HOLDER = f"""
import sys, time, types
pkg = types.ModuleType("storage"); pkg.__path__ = [{os.path.join(ROOT, "storage")!r}]; sys.modules["storage"] = pkg
from storage.lock import acquire_lock
held = acquire_lock(sys.argv[1], "study agc_lambda")
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        p.kill()
        p.wait()


def test_local_second_holder_refused_until_first_dies(tmp_path, holder):
    out = str(tmp_path / "out")
    with pytest.raises(StorageError) as e:
        acquire_lock(out, "study second")
    msg = str(e.value)
    assert f"in use by study agc_lambda (host {os.uname().nodename}, pid {holder.pid}) since 20" in msg
    assert msg.endswith("wait for it, or use another --output") and "\n" not in msg
    os.kill(holder.pid, signal.SIGKILL)  # no clean-up runs: the kernel must free the flock
    holder.wait()
    with acquire_lock(out, "study second") as held:
        assert held.owner == "study second"


def test_local_in_process_and_wait(tmp_path):
    first = acquire_lock(str(tmp_path), "first")
    with pytest.raises(StorageError, match="in use by first"):
        acquire_lock(str(tmp_path), "second")  # same process, own file description: refused too
    threading.Timer(0.5, first.release).start()
    t = time.monotonic()
    with acquire_lock(str(tmp_path), "second", wait_s=10, poll_s=0.1):
        assert 0.3 < time.monotonic() - t < 5  # waited for the release, not for the timeout
        with pytest.raises(StorageError, match="in use by second"):
            acquire_lock(str(tmp_path), "third", wait_s=0.3, poll_s=0.1)
    acquire_lock(str(tmp_path), "third").release()  # the with block released it


def test_local_concurrent_acquires_exactly_one_wins(tmp_path):
    wins, barrier = [], threading.Barrier(6)

    def go(i):
        barrier.wait()
        try:
            wins.append(acquire_lock(str(tmp_path), f"t{i}"))
        except StorageError:
            pass

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wins) == 1
    wins[0].release()


def _s3_lock_name(s3_bucket, sub):  # noqa: F811
    import boto3

    c = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    return c, s3_bucket.removeprefix("s3://"), f"{sub}/.lock"


def test_s3_lease_refuses_second_and_releases(s3_bucket):  # noqa: F811
    uri = s3_bucket + "/studies/a"
    first = acquire_lock(uri, "study one", heartbeat=False)
    assert isinstance(first._backend, lock._S3Lease)
    with pytest.raises(StorageError, match=r"s3://nfnet-test/studies/a is in use by study one .*since .*lease until"):
        acquire_lock(uri, "study two")
    c, bucket, key = _s3_lock_name(s3_bucket, "studies/a")
    # the server itself refuses a second create: this is what makes two simultaneous starts safe
    with pytest.raises(Exception, match="PreconditionFailed"):
        c.put_object(Bucket=bucket, Key=key, Body=b"{}", IfNoneMatch="*")
    first.release()
    with pytest.raises(c.exceptions.NoSuchKey):
        c.get_object(Bucket=bucket, Key=key)
    with acquire_lock(uri, "study two", heartbeat=False):
        pass


def test_s3_expired_lease_taken_over_and_old_holder_told(s3_bucket, monkeypatch):  # noqa: F811
    uri = s3_bucket + "/studies/b"
    clock = [1000.0]
    monkeypatch.setattr(leases, "_now", lambda: clock[0])
    dead = acquire_lock(uri, "crashed study", ttl_s=60, heartbeat=False)
    clock[0] += 50
    dead.renew()  # renewing moves the expiry to 1050 + 60
    clock[0] += 50
    with pytest.raises(StorageError, match="in use by crashed study"):
        acquire_lock(uri, "new study", ttl_s=60)
    clock[0] += 20  # 1120 > 1110: the holder stopped renewing
    new = acquire_lock(uri, "new study", ttl_s=60, heartbeat=False)
    with pytest.raises(StorageError, match="lost the lease .*taken over"):
        dead.renew()
    dead.release()  # conditional delete: must not remove the new holder's lease
    with pytest.raises(StorageError, match="in use by new study"):
        acquire_lock(uri, "third", ttl_s=60)
    new.release()


def test_s3_heartbeat_keeps_lease(s3_bucket):  # noqa: F811
    uri = s3_bucket + "/studies/c"
    with acquire_lock(uri, "beating", ttl_s=1.5) as held:  # renews every 0.5 s
        time.sleep(2.5)  # past one ttl: without renewals the lease would have expired
        with pytest.raises(StorageError, match="in use by beating"):
            acquire_lock(uri, "other", ttl_s=1.5)
        held.check()


def test_best_effort_lease_for_other_stores(tmp_path, monkeypatch):
    # gs:// and friends use a plain put + read-back; exercise that path on a local filesystem
    monkeypatch.setattr(leases, "_SETTLE_S", 0.0)
    clock = [0.0]
    monkeypatch.setattr(leases, "_now", lambda: clock[0])
    fs, path = pafs.LocalFileSystem(), str(tmp_path / ".lock")

    def lease(owner):
        return lock._PlainLease(fs, path, {"owner": owner, "token": owner, "since": 0.0, "ttl_s": 10})

    a, b = lease("a"), lease("b")
    assert a.try_acquire() is None
    assert b.try_acquire()["owner"] == "a"
    clock[0] = 11
    assert b.try_acquire() is None  # expired: taken over
    with pytest.raises(StorageError, match="lost the lease .*taken over by b"):
        a.renew()
    a.release()
    assert os.path.exists(path)  # a no longer owns it, so it left b's lease alone
    b.release()
    assert not os.path.exists(path)


@pytest.mark.parametrize("bad", [{"ttl_s": 0}, {"ttl_s": -5}])
def test_bad_ttl(tmp_path, bad):
    with pytest.raises(StorageError, match="ttl_s must be > 0"):
        acquire_lock(str(tmp_path), "x", **bad)


# --- the lease survives transport faults, and a lost lease fences its holder's writes (issue 21, item 2)

def _client_error(status: int, code: str):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def _fail_puts(held, errors):
    """Make the lease's next puts fail with `errors` (one per put; a callable error is called with the real put)."""
    real, queue = held._backend.client.put_object, list(errors)

    def put(**kw):
        if not queue:
            return real(**kw)
        e = queue.pop(0)
        raise e(real, kw) if callable(e) else e
    held._backend.client.put_object = put
    return queue


def test_s3_renew_retries_a_503_and_a_dropped_connection(s3_bucket, monkeypatch):  # noqa: F811
    from botocore.exceptions import EndpointConnectionError

    monkeypatch.setattr(leases, "_sleep", lambda s: None)
    held = acquire_lock(s3_bucket + "/studies/r1", "study one", ttl_s=60, heartbeat=False)
    left = _fail_puts(held, [_client_error(503, "ServiceUnavailable"), EndpointConnectionError(endpoint_url="x")])
    held.renew()  # today: the first 503 ends the lease for good
    assert left == []
    held.check()
    lock.check_fence(held.fence())
    with pytest.raises(StorageError, match="in use by study one"):
        acquire_lock(s3_bucket + "/studies/r1", "study two", ttl_s=60)
    held.release()


def test_s3_renew_recognises_its_own_etag_after_a_lost_response(s3_bucket):  # noqa: F811
    held = acquire_lock(s3_bucket + "/studies/r2", "study one", ttl_s=60, heartbeat=False)

    def landed_then_retried(real, kw):  # the put lands, its response is lost, botocore sends it again: 412
        real(**kw)
        try:
            real(**kw)
        except Exception as e:
            return e
        raise AssertionError("the repeated If-Match put should have been refused")
    _fail_puts(held, [landed_then_retried])
    held.renew()
    held.renew()  # and renews on the adopted ETag afterwards
    held.check()
    lock.check_fence(held.fence())
    held.release()
    with acquire_lock(s3_bucket + "/studies/r2", "study two", heartbeat=False):
        pass  # released: the adopted ETag was the lease's real one


def test_s3_heartbeat_that_cannot_renew_stops_the_study_writing(s3_bucket, monkeypatch, capsys):  # noqa: F811
    from botocore.exceptions import EndpointConnectionError

    monkeypatch.setattr(leases, "_RETRY_S", (0.05, 0.05))
    held = acquire_lock(s3_bucket + "/studies/r3", "study one", ttl_s=1.5)  # beats every 0.5 s
    _fail_puts(held, [EndpointConnectionError(endpoint_url="x")] * 1000)  # a lasting outage
    deadline = time.monotonic() + 10
    while not held.lost() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(lock.LeaseLost, match="could not renew the lease .*before it expires"):
        held.check()
    # lost() can turn true before the heartbeat has printed and returned (or through check()'s own expiry test,
    # while the heartbeat still retries): give the thread its moment, then it must have ended with its message
    held._thread.join(timeout=5)
    assert not held._thread.is_alive()
    assert "warning: could not renew the lease" in capsys.readouterr().err  # the heartbeat said why it ended
    held.release()


def test_stalled_holder_past_expiry_is_fenced_after_a_second_driver_takes_over(s3_bucket, monkeypatch):  # noqa: F811
    from studies.sweep.tables import epochs_schema, results_schema

    clock = [1000.0]
    monkeypatch.setattr(leases, "_now", lambda: clock[0])
    uri = s3_bucket + "/studies/r4"
    first = acquire_lock(uri, "study one", ttl_s=60, heartbeat=False)
    assert first.generation == 1
    table = storage_results(uri, first.fence())
    table.append([{"trial_key": "a", "study": "s"}])
    clock[0] += 55  # stalled (a paused VM): no renewal; 5 s left is inside the fence margin
    with pytest.raises(lock.LeaseLost, match="expires at .*without a renewal"):
        table.append([{"trial_key": "b", "study": "s"}])
    clock[0] += 10  # past expiry: a second driver takes over
    second = acquire_lock(uri, "study two", ttl_s=60, heartbeat=False)
    assert second.generation == 2
    with pytest.raises(lock.LeaseLost, match=r"no longer held by this study \(generation 1; now .*in use by study two"):
        table.append([{"trial_key": "b", "study": "s"}])
    with pytest.raises(lock.LeaseLost, match="taken over by study two"):
        first.check()  # the stalled driver wakes: its own check says so (it stops starting trials)
    theirs = storage_results(uri, second.fence())
    theirs.append([{"trial_key": "c", "study": "s"}])
    assert theirs.read().column("trial_key").to_pylist() == ["a", "c"]  # b was never written
    assert results_schema and epochs_schema
    second.release()


def test_local_lock_generation_and_fence(tmp_path):
    with acquire_lock(str(tmp_path), "one") as a:
        assert a.generation == 1
        lock.check_fence(a.fence())
        f = a.fence()
    with pytest.raises(lock.LeaseLost, match="no longer held"):
        lock.check_fence(f)  # released (the file stays, its token is gone only once another takes it)
    with acquire_lock(str(tmp_path), "two") as b:
        assert b.generation == 2
        with pytest.raises(lock.LeaseLost, match="in use by two"):
            lock.check_fence(f)


def storage_results(uri, fence):
    import pyarrow as pa

    from storage import ResultsTable

    return ResultsTable(uri + "/results", pa.schema([("trial_key", pa.string()), ("study", pa.string())]),
                        fence=fence)


def test_a_discarded_lock_leaves_no_file_and_never_two_holders(tmp_path, monkeypatch):
    # A refused study or preparation leaves its location as it found it: release(discard=True) deletes .lock. A
    # taker that opened the old file just before (and so wins a flock on a file no longer at the path) must notice
    # and lock the file at the path, or two holders could exist at once.
    first = acquire_lock(str(tmp_path), "first")
    stale = os.open(str(tmp_path / ".lock"), os.O_RDWR)  # a second taker's open, just before the discard
    first.release(discard=True)
    assert not (tmp_path / ".lock").exists()
    real, opened = leases._Flock._open, []

    def open_stale_first(self):
        opened.append(1)
        return stale if len(opened) == 1 else real(self)

    monkeypatch.setattr(leases._Flock, "_open", open_stale_first)
    with acquire_lock(str(tmp_path), "second") as second:
        assert len(opened) == 2  # the stale file was let go, the one at the path locked
        assert second.generation == 1
        with pytest.raises(StorageError, match="in use by second"):
            acquire_lock(str(tmp_path), "third")
    acquire_lock(str(tmp_path), "third").release()


def test_a_fence_read_while_a_new_holder_writes_its_name_names_the_new_holder(tmp_path):
    """A new holder truncates the lock file, then writes itself in: the old holder's fence read that falls between
    must wait for the name instead of reporting "another process" (seen in CI as a flaky lost-lock message)."""
    import json

    held = acquire_lock(tmp_path / "study", "study one", heartbeat=False)
    fence = held.fence()
    path = tmp_path / "study" / ".lock"
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 0)  # the instant between the new holder's truncate and its write

        def write_later():
            time.sleep(0.03)
            os.pwrite(fd, json.dumps({"owner": "study two", "token": "theirs", "generation": 2}).encode(), 0)

        t = threading.Thread(target=write_later)
        t.start()
        with pytest.raises(lock.LeaseLost, match="in use by study two"):
            lock.check_fence(fence)
        t.join()
    finally:
        os.close(fd)
        held.release()
