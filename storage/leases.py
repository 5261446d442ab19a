"""The lease backends under storage.lock: a kernel flock for local paths, a conditional-put lease object on s3://,
a best-effort lease object elsewhere (storage/lock.py's docstring says what each guarantees). Each has
try_acquire() (None, or who holds it), renew(), holder() (the lease's current content, for fences), release()."""

import fcntl
import json
import os
import time
import warnings

import pyarrow.fs as pafs

from storage.uri import StorageError, join, one_line, resolve, s3_settings, transient

LOCK_NAME = ".lock"
_SETTLE_S = 0.5  # best-effort leases: how long a rival's put has to land before we read ours back
_RETRY_S = (0.5, 10.0)  # a failed renewal is retried after 0.5 s, doubling up to 10 s, until the lease expires


class LeaseLost(StorageError):
    """This process no longer holds the lock it was writing under: stop writing there."""


def fence_margin(ttl_s: float) -> float:
    """How far from expiry a lease must be for a write under it: a write takes far less, a heartbeat renews at
    ttl_s / 3, so a healthy lease is always at least 2/3 ttl_s from expiry."""
    return min(30.0, ttl_s / 10)


def _now() -> float:
    return time.time()  # one seam, so tests can move the clock


def _sleep(s: float) -> None:
    time.sleep(s)  # one seam, so tests need not wait out retries


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
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = _parse(os.pread(fd, 65536, 0))
                os.close(fd)
                return held or {}
            if self._current(fd):
                break
            os.close(fd)  # a holder discarded the file after we opened it: lock the one at the path now
        # who holds it, for the refusal message of the next one and for fences; the lock itself is the flock
        self.info["generation"] = int((_parse(os.pread(fd, 65536, 0)) or {}).get("generation", 0)) + 1
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info).encode(), 0)
        self.fd = fd
        return None

    def _open(self) -> int:
        folder = os.path.dirname(self.path)
        try:
            os.makedirs(folder, exist_ok=True)
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # a holder that discarded the lock removed its empty folder in between
                os.makedirs(folder, exist_ok=True)
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise StorageError(f"cannot create lock file {self.path} ({one_line(e)}); check the folder's "
                               "permissions or pass another location") from e

    def _current(self, fd: int) -> bool:
        """Whether fd is still the file at the path: discard() unlinks it while holding the flock, so a flock won on
        the old file after that guards nothing."""
        try:
            st, now = os.fstat(fd), os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)

    def renew(self) -> None:
        pass

    def holder(self) -> dict | None:
        """Who holds it: the file's content while some process holds the flock, else None (a released lock's file
        keeps its last holder's text)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held (by us or by another process): the text is the holder's
            for _ in range(20):  # a new holder truncates, then writes: an empty read is that instant, not an answer
                held = _parse(os.pread(fd, 65536, 0))
                if held is not None:
                    return held
                time.sleep(0.005)
            return None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self, discard: bool = False) -> None:
        """discard: delete the lock file too (before letting go of the flock, so nobody locks it meanwhile)."""
        if self.fd is not None:
            if discard:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _retrying(once, lease, retryable, give_up) -> None:
    """once() until it succeeds: a retryable fault is retried (after 0.5 s, doubling up to 10 s) while the lease
    still has more than its fence margin left; past that, or on any other fault, give_up(e) is raised."""
    delay = _RETRY_S[0]
    while True:
        try:
            return once()
        except LeaseLost:
            raise
        except Exception as e:
            if not retryable(e) or _now() + delay >= lease.expires - fence_margin(lease.info["ttl_s"]):
                raise give_up(e) from e
            _sleep(delay)
            delay = min(2 * delay, _RETRY_S[1])


def _code(e) -> tuple[str, int | None]:
    r = getattr(e, "response", None) or {}
    return r.get("Error", {}).get("Code", ""), r.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _precondition_failed(e) -> bool:
    code, status = _code(e)
    # 409 ConditionalRequestConflict: a concurrent conditional write to the same key is in flight
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (409, 412)


def _s3_transient(e) -> bool:
    """A fault of the transport (botocore's own errors, a 5xx, throttling): the same request may succeed later."""
    if type(e).__module__.startswith("botocore") and not hasattr(e, "response"):
        return True  # BotoCoreError: EndpointConnectionError, ReadTimeoutError, ConnectionClosedError, ...
    code, status = _code(e)
    return (status or 0) >= 500 or code in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                                            "InternalError", "ServiceUnavailable")


class _S3Lease:
    """Lease object written with S3 conditional puts (If-None-Match to create, If-Match to renew or take over)."""

    def __init__(self, bucket: str, key: str, info: dict):
        import boto3

        endpoint, region = s3_settings()
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name=region)
        self.bucket, self.key, self.info, self.etag, self.expires = bucket, key, info, None, 0.0

    def _put(self, **cond) -> None:
        expires = _now() + self.info["ttl_s"]
        body = json.dumps({**self.info, "expires": expires}).encode()
        self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **cond)["ETag"]
        self.expires = expires

    def _fail(self, e) -> StorageError:
        return StorageError(f"cannot write lease s3://{self.bucket}/{self.key} ({one_line(e)}); check the bucket, "
                            "credentials and AWS_ENDPOINT_URL")

    def _get(self) -> tuple[dict | None, str | None]:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:
            if _code(e)[0] == "NoSuchKey" or _code(e)[1] == 404:
                return None, None
            raise
        return _parse(r["Body"].read()), r["ETag"]

    def holder(self) -> dict | None:
        return self._get()[0]

    def try_acquire(self) -> dict | None:
        self.info["generation"] = 1
        try:
            self._put(IfNoneMatch="*")
            return None
        except Exception as e:
            if not _precondition_failed(e):
                raise self._fail(e) from e
        try:
            held, etag = self._get()
        except Exception as e:
            raise self._fail(e) from e
        if etag is None:
            return {}  # released between our put and our read: the next poll will get it
        held = held or {}
        if held.get("expires", 0) > _now():
            return held
        self.info["generation"] = int(held.get("generation", 0)) + 1
        try:  # expired: its holder stopped renewing (died); take it over only if nobody else did first
            self._put(IfMatch=etag)
            return None
        except Exception as e:
            if _precondition_failed(e):
                return held
            raise self._fail(e) from e

    def _lost(self, held: dict | None) -> LeaseLost:
        who = (held or {}).get("owner", "nobody")
        return LeaseLost(f"lost the lease s3://{self.bucket}/{self.key}: it expired and was taken over by {who} "
                         "(renew more often than ttl_s); stop writing there")

    def _renew_once(self) -> None:
        try:
            self._put(IfMatch=self.etag)
            return
        except Exception as e:
            if not _precondition_failed(e):
                raise
        held, etag = self._get()
        if not held or held.get("token") != self.info["token"]:
            raise self._lost(held)
        # Still ours: an earlier put of ours landed though its response was lost (botocore retried it and the
        # retry met our own new ETag). Adopt that ETag and renew on it.
        self.etag = etag
        self._put(IfMatch=etag)

    def renew(self) -> None:
        """Extend the lease; transport faults are retried until it would expire (then it may be taken)."""
        def give_up(e):
            if not _s3_transient(e) and not _precondition_failed(e):
                return self._fail(e)
            return LeaseLost(f"could not renew the lease s3://{self.bucket}/{self.key} before it expires "
                             f"({one_line(e)}); another driver may take it, so this one stops writing there")
        _retrying(self._renew_once, self, lambda e: _s3_transient(e) or _precondition_failed(e), give_up)

    def release(self) -> None:
        if self.etag is None:
            return
        try:  # conditional: never delete a lease that someone took over from us
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception:
            pass  # already taken over (412), gone, or unreachable (it expires); either way no longer ours
        self.etag = None


class _PlainLease:
    """Lease object through pyarrow.fs with unconditional puts: best effort (see the module docstring)."""

    def __init__(self, fs: pafs.FileSystem, path: str, info: dict):
        self.fs, self.path, self.info, self.held, self.expires = fs, path, info, False, 0.0

    def _read(self) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return _parse(f.read())
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"cannot read lease {self.path} ({one_line(e)}); check the URI and credentials") from e

    holder = _read

    def _write(self) -> None:
        expires = _now() + self.info["ttl_s"]
        try:
            with self.fs.open_output_stream(self.path) as f:
                f.write(json.dumps({**self.info, "expires": expires}).encode())
        except OSError as e:
            raise StorageError(f"cannot write lease {self.path} ({one_line(e)}); check the URI and "
                               "credentials") from e
        self.expires = expires

    def _mine(self, held: dict | None) -> bool:
        return bool(held) and held.get("token") == self.info["token"]

    def try_acquire(self) -> dict | None:
        held = self._read()
        if held and not self._mine(held) and held.get("expires", 0) > _now():
            return held
        self.info["generation"] = int((held or {}).get("generation", 0)) + 1
        self._write()
        time.sleep(_SETTLE_S)
        back = self._read()
        if not self._mine(back):
            return back or {}
        self.held = True
        return None

    def _renew_once(self) -> None:
        held = self._read()
        if not self._mine(held):
            raise LeaseLost(f"lost the lease {self.path}: it expired and was taken over by "
                            f"{(held or {}).get('owner', 'nobody')} (renew more often than ttl_s); stop writing")
        self._write()

    def renew(self) -> None:
        _retrying(self._renew_once, self, lambda e: isinstance(e, StorageError) and transient(e.__cause__ or e),
                  lambda e: LeaseLost(f"could not renew the lease {self.path} ({one_line(e)}); stop writing there"))

    def release(self) -> None:
        if self.held and self._mine(self._read()):
            self.fs.delete_file(self.path)
        self.held = False


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
