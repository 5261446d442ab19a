"""One writer per location: acquire_lock(uri, owner) refuses (or waits for) a second holder.

Local paths: fcntl.flock on <uri>/.lock. The kernel drops it when the holder's process dies, so a crash never
leaves a stale lock (Linux maps flock to POSIX locks on NFS, so a shared NFS mount works too).

s3://: a lease object <uri>/.lock created with a conditional put (boto3, If-None-Match: *), holding the owner and
an expiry time. The holder renews it (renew(), or the heartbeat thread that acquire_lock starts) before it
expires; a lease past its expiry belongs to a holder that died, and anyone may take it over, again conditionally
(If-Match: <etag>), so two takers cannot both win. Expiry compares wall clocks of different machines: keep them
NTP-synced; the default ttl_s leaves minutes of slack.

Other object stores (gs://, or s3:// without boto3): pyarrow.fs has no conditional put, so the lease is written
with a plain put and read back after a pause. This is best effort: two writers that start within that pause can
both believe they hold it. It still refuses the common case, a second study started while the first runs.
"""

import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
import warnings

import pyarrow.fs as pafs

from storage.uri import StorageError, join, one_line, resolve, s3_settings

DEFAULT_TTL_S = 300.0
LOCK_NAME = ".lock"
_SETTLE_S = 0.5  # best-effort leases: how long a rival's put has to land before we read ours back


def _now() -> float:
    return time.time()  # one seam, so tests can move the clock


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _parse(blob: bytes | None) -> dict | None:
    try:
        held = json.loads(blob) if blob else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return held if isinstance(held, dict) else None


class _Flock:
    """Kernel lock on a local file; no expiry needed, process death frees it."""

    def __init__(self, path: str, info: dict):
        self.path, self.info, self.fd = path, info, None

    def try_acquire(self) -> dict | None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise StorageError(f"cannot create lock file {self.path} ({one_line(e)}); check the folder's "
                               "permissions or pass another location") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = _parse(os.pread(fd, 65536, 0))
            os.close(fd)
            return held or {}
        # who holds it, for the refusal message of the next one; the lock itself is the flock, not this text
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info).encode(), 0)
        self.fd = fd
        return None

    def renew(self) -> None:
        pass

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _precondition_failed(e) -> bool:
    code = e.response.get("Error", {}).get("Code", "")
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    # 409 ConditionalRequestConflict: a concurrent conditional write to the same key is in flight
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412)


class _S3Lease:
    """Lease object written with S3 conditional puts (If-None-Match to create, If-Match to renew or take over)."""

    def __init__(self, bucket: str, key: str, info: dict):
        import boto3
        from botocore.exceptions import ClientError

        endpoint, region = s3_settings()
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=region)
        self.ClientError = ClientError
        self.bucket, self.key, self.info, self.etag = bucket, key, info, None

    def _put(self, **cond) -> str:
        body = json.dumps({**self.info, "expires": _now() + self.info["ttl_s"]}).encode()
        return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **cond)["ETag"]

    def _fail(self, e) -> StorageError:
        return StorageError(f"cannot write lease s3://{self.bucket}/{self.key} ({one_line(e)}); check the bucket, "
                            "credentials and AWS_ENDPOINT_URL")

    def try_acquire(self) -> dict | None:
        try:
            self.etag = self._put(IfNoneMatch="*")
            return None
        except self.ClientError as e:
            if not _precondition_failed(e):
                raise self._fail(e) from e
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.ClientError as e:
            if _precondition_failed(e) or e.response.get("Error", {}).get("Code") == "NoSuchKey":
                return {}  # released between our put and our read: the next poll will get it
            raise self._fail(e) from e
        held = _parse(r["Body"].read()) or {}
        if held.get("expires", 0) > _now():
            return held
        try:  # expired: its holder stopped renewing (died); take it over only if nobody else did first
            self.etag = self._put(IfMatch=r["ETag"])
            return None
        except self.ClientError as e:
            if _precondition_failed(e):
                return held
            raise self._fail(e) from e

    def renew(self) -> None:
        try:
            self.etag = self._put(IfMatch=self.etag)
        except self.ClientError as e:
            if _precondition_failed(e):
                raise StorageError(f"lost the lease s3://{self.bucket}/{self.key}: it expired and was taken over "
                                   "(renew more often than ttl_s); stop writing there") from e
            raise self._fail(e) from e

    def release(self) -> None:
        if self.etag is None:
            return
        try:  # conditional: never delete a lease that someone took over from us
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except self.ClientError:
            pass  # already taken over (412) or gone; either way it is no longer ours
        self.etag = None


class _PlainLease:
    """Lease object through pyarrow.fs with unconditional puts: best effort (see the module docstring)."""

    def __init__(self, fs: pafs.FileSystem, path: str, info: dict):
        self.fs, self.path, self.info, self.held = fs, path, info, False

    def _read(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return _parse(f.read())
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"cannot read lease {self.path} ({one_line(e)}); check the URI and credentials") from e

    def _write(self) -> None:
        try:
            with self.fs.open_output_stream(self.path) as f:
                f.write(json.dumps({**self.info, "expires": _now() + self.info["ttl_s"]}).encode())
        except OSError as e:
            raise StorageError(f"cannot write lease {self.path} ({one_line(e)}); check the URI and "
                               "credentials") from e

    def _mine(self, held: dict | None) -> bool:
        return bool(held) and held.get("token") == self.info["token"]

    def try_acquire(self) -> dict | None:
        held = self._read()
        if held and not self._mine(held) and held.get("expires", 0) > _now():
            return held
        self._write()
        time.sleep(_SETTLE_S)
        back = self._read()
        if not self._mine(back):
            return back or {}
        self.held = True
        return None

    def renew(self) -> None:
        held = self._read()
        if not self._mine(held):
            raise StorageError(f"lost the lease {self.path}: it expired and was taken over by "
                               f"{(held or {}).get('owner', 'nobody')} (renew more often than ttl_s); stop writing")
        self._write()

    def release(self) -> None:
        if self.held and self._mine(self._read()):
            self.fs.delete_file(self.path)
        self.held = False


class Lock:
    """A held lock; release() (or leaving the with block) frees it. renew() extends a lease; check() raises if
    the heartbeat found the lease lost."""

    def __init__(self, uri: str, owner: str, backend, ttl_s: float, heartbeat: bool):
        self.uri, self.owner, self.since, self._backend = uri, owner, backend.info["since"], backend
        self._lost: StorageError | None = None
        self._stop = threading.Event()
        self._thread = None
        if heartbeat and not isinstance(backend, _Flock):
            self._thread = threading.Thread(target=self._beat, args=(ttl_s / 3,), daemon=True,
                                            name=f"lease-heartbeat {uri}")
            self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self._backend.renew()
            except StorageError as e:
                self._lost = e
                print(f"warning: {e}", file=sys.stderr, flush=True)
                return

    def renew(self) -> None:
        self._backend.renew()

    def check(self) -> None:
        if self._lost is not None:
            raise self._lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._backend.release()

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _backend(uri: str, info: dict):
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return _Flock(join(path, LOCK_NAME), info)
    if isinstance(fs, pafs.S3FileSystem):
        try:
            bucket, _, prefix = path.partition("/")
            return _S3Lease(bucket, join(prefix, LOCK_NAME).lstrip("/"), info)
        except ImportError:
            warnings.warn(f"boto3 is not installed, so the lock on {uri} is best effort (no conditional put); "
                          "pip install boto3", stacklevel=3)
    return _PlainLease(fs, join(path, LOCK_NAME), info)


def _in_use(uri: str, held: dict) -> str:
    who = held.get("owner", "another process")
    where = f" (host {held['host']}, pid {held['pid']})" if "host" in held and "pid" in held else ""
    since = f" since {_stamp(held['since'])}" if isinstance(held.get("since"), (int, float)) else ""
    until = f" (lease until {_stamp(held['expires'])})" if isinstance(held.get("expires"), (int, float)) else ""
    return f"{uri} is in use by {who}{where}{since}{until}"


def acquire_lock(uri: str | os.PathLike, owner: str, ttl_s: float = DEFAULT_TTL_S, *, wait_s: float | None = 0.0,
                 poll_s: float = 1.0, heartbeat: bool = True) -> Lock:
    """Hold the location uri (a directory or prefix) for owner, or raise StorageError naming the current holder.

    wait_s: 0 refuses at once; a number waits up to that many seconds; None waits as long as it takes.
    ttl_s: object-store leases expire this long after their last renewal; heartbeat renews every ttl_s / 3.
    """
    uri = os.fspath(uri)
    if ttl_s <= 0:
        raise StorageError(f"ttl_s must be > 0, got {ttl_s}; pass a lease length in seconds")
    info = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "since": _now(), "ttl_s": ttl_s,
            "token": uuid.uuid4().hex}
    backend = _backend(uri, info)
    deadline = None if wait_s is None else time.monotonic() + wait_s
    told = False
    while True:
        held = backend.try_acquire()
        if held is None:
            return Lock(uri, owner, backend, ttl_s, heartbeat)
        if deadline is not None and time.monotonic() >= deadline:
            raise StorageError(f"{_in_use(uri, held)}; wait for it, or use another --output")
        if not told:
            print(f"waiting: {_in_use(uri, held)}", file=sys.stderr, flush=True)
            told = True
        time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
