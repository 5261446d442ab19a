"""One writer per location: acquire_lock(uri, owner) refuses (or waits for) a second holder.

Local paths: fcntl.flock on <uri>/.lock. The kernel drops it when the holder's process dies, so a crash never
leaves a stale lock (Linux maps flock to POSIX locks on NFS, so a shared NFS mount works too). release(discard=True)
deletes the file while still holding it (a location left as it was found); a taker checks, once it has the flock,
that the file it locked is still the one at the path, and otherwise locks the new one.

s3://: a lease object <uri>/.lock created with a conditional put (boto3, If-None-Match: *), holding the owner and
an expiry time. The holder renews it (renew(), or the heartbeat thread that acquire_lock starts) before it
expires; a lease past its expiry belongs to a holder that died, and anyone may take it over, again conditionally
(If-Match: <etag>), so two takers cannot both win. Expiry compares wall clocks of different machines: keep them
NTP-synced; the default ttl_s leaves minutes of slack. A renewal that meets a transport fault (a 503, a dropped
connection) is retried until the lease's own expiry; a 412 whose lease still carries our token is our own earlier
put that landed (botocore retried it after a lost response), and is adopted, not called a loss.

Fencing: every lease has a generation (1 when created, +1 on each take-over, also for local locks) and a token.
Lock.fence() is a small picklable value that any process (a Tune trial on another node) checks before it writes
(check_fence): the lock must still carry its token and, on an object store, expire more than fence_margin(ttl_s)
(min(30 s, ttl_s / 10)) from now. A holder that stalled past its expiry, or whose heartbeat lost the lease, is
refused its next write. Object stores cannot make that write conditional on the lease: the margin is what covers
a write already under way.

Other object stores (gs://, or s3:// without boto3): pyarrow.fs has no conditional put, so the lease is written
with a plain put and read back after a pause. This is best effort: two writers that start within that pause can
both believe they hold it. It still refuses the common case, a second study started while the first runs.
"""

import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from storage import leases
from storage.leases import LeaseLost, _backend, _Flock, _PlainLease, _S3Lease, _stamp, fence_margin  # noqa: F401
from storage.uri import StorageError, one_line

DEFAULT_TTL_S = 300.0
__all__ = ["DEFAULT_TTL_S", "Fence", "LeaseLost", "Lock", "acquire_lock", "check_fence"]


@dataclass(frozen=True)
class Fence:
    """What a writer under a lock checks before each write (check_fence), in any process: picklable."""

    uri: str
    token: str
    generation: int
    ttl_s: float


_FENCE_BACKENDS: dict[tuple[str, str], object] = {}  # one client per fence and process, not one per write


def check_fence(fence: Fence) -> None:
    """Raise LeaseLost unless the lock at fence.uri is still held under fence's token (generation) and, on an object
    store, is not about to expire."""
    key = (fence.uri, fence.token)
    if key not in _FENCE_BACKENDS:
        _FENCE_BACKENDS[key] = _backend(fence.uri, {"token": fence.token, "ttl_s": fence.ttl_s})
    backend = _FENCE_BACKENDS[key]
    try:
        held = backend.holder()
    except Exception as e:  # the lease cannot be read: nothing proves the write is still ours
        raise LeaseLost(f"cannot read the lock of {fence.uri} before writing ({one_line(e)}); not writing") from e
    if not held or held.get("token") != fence.token:
        raise LeaseLost(f"{fence.uri} is no longer held by this study (generation {fence.generation}; now "
                        f"{_in_use(fence.uri, held or {})}); refusing to write: another driver may be writing there")
    if not isinstance(backend, _Flock) and held.get("expires", 0) < leases._now() + fence_margin(fence.ttl_s):
        raise LeaseLost(f"the lease on {fence.uri} (generation {fence.generation}) expires at "
                        f"{_stamp(held.get('expires', 0))} without a renewal; refusing to write: another driver "
                        "may take it over")


class Lock:
    """A held lock; release() (or leaving the with block) frees it. renew() extends a lease; check() raises
    LeaseLost if the heartbeat lost it or it was left to run out (a stalled holder); fence() is what writers check."""

    def __init__(self, uri: str, owner: str, backend, ttl_s: float, heartbeat: bool):
        self.uri, self.owner, self.since, self._backend = uri, owner, backend.info["since"], backend
        self.ttl_s, self.generation = ttl_s, backend.info["generation"]
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
            except Exception as e:  # anything else would end the thread silently and the lease with it
                self._lost = e if isinstance(e, LeaseLost) else LeaseLost(f"lease on {self.uri}: {one_line(e)}")
                print(f"warning: {self._lost}; no new trials start", file=sys.stderr, flush=True)
                return

    def renew(self) -> None:
        self._backend.renew()

    def lost(self) -> bool:
        try:
            self.check()
        except LeaseLost:
            return True
        return False

    def check(self) -> None:
        if self._lost is not None:
            raise self._lost
        if isinstance(self._backend, _Flock):  # cannot run out; its file must still name us (a cheap local read)
            try:
                return check_fence(self.fence())
            except LeaseLost as e:
                self._lost = e
                raise
        expires = self._backend.expires
        if expires < leases._now() + fence_margin(self.ttl_s):
            try:  # the heartbeat did not run in time (a stalled process): ours only if nobody took it meanwhile
                self._backend.renew()
            except Exception as e:
                self._lost = e if isinstance(e, LeaseLost) else LeaseLost(f"lease on {self.uri}: {one_line(e)}")
                raise self._lost from e

    @property
    def exclusive(self) -> bool:
        """Whether no second holder can exist at once (flock, S3's conditional lease); False for the best-effort
        lease of other object stores (two that start together can both believe they hold it)."""
        return not isinstance(self._backend, _PlainLease)

    def fence(self) -> Fence:
        return Fence(self.uri, self._backend.info["token"], self.generation, self.ttl_s)

    def release(self, discard: bool = False) -> None:
        """discard: delete the lock file too, for a location its holder leaves as it found it (a study or a
        preparation refused before it wrote anything). Object-store leases are deleted on every release."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if isinstance(self._backend, _Flock):
            self._backend.release(discard=discard)
        else:
            self._backend.release()

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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
    info = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "since": leases._now(),
            "ttl_s": ttl_s, "token": uuid.uuid4().hex}
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
