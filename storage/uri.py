"""One place that turns a URI into (pyarrow FileSystem, path); everything else goes through it."""

import errno
import os
import posixpath
import re
import uuid
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs


class StorageError(ValueError):
    """Bad data or location; the message names the file and the fix."""


class StorageUnavailable(StorageError):
    """Storage could not be reached (network, throttling, a server's 5xx): the same request may succeed later, so
    a run that meets it is retried, never recorded as failed."""


class StorageUnwritable(StorageError):
    """The storage refuses writes until someone acts: no space left (ENOSPC, EDQUOT), a read-only file system (EROFS),
    permission or credentials lost (EACCES, EPERM, an object store's AccessDenied). Retrying cannot help, so it is
    never retried; the message (one line) names the path and the fix. `errno` and `path` say which and where."""

    errno: int | None = None
    path: str = ""

    def then(self, step: str) -> "StorageUnwritable":
        """The same fault, its fix followed by the caller's next step ('continue the study with --resume')."""
        e = StorageUnwritable(f"{self}, then {step}")
        e.errno, e.path = self.errno, self.path
        return e


# errno -> (what happened, the fix)
_REFUSED = {errno.ENOSPC: ("no space left on the device", "free space there"),
            errno.EDQUOT: ("the disk quota is used up", "free space there or raise the quota"),
            errno.EROFS: ("the file system is read-only", "make it writable (remount it read-write)"),
            errno.EACCES: ("permission denied", "give this user write access to it (or fix the credentials)"),
            errno.EPERM: ("operation not permitted", "give this user write access to it")}
_DENIED = ("ACCESS_DENIED", "AccessDenied", "HTTP 403", "Forbidden")  # an object store's EACCES


def refused_write(e: BaseException, path: str) -> StorageUnwritable | None:
    """A write fault that stays until someone fixes it (no space, read-only, no permission), as one line naming
    `path` and the fix; None for any other error."""
    code = getattr(e, "errno", None)
    if code in _REFUSED:
        why, fix = _REFUSED[code]
        why = f"{why} ({errno.errorcode[code]})"
    elif isinstance(e, OSError) and any(w.lower() in str(e).lower() for w in _DENIED):
        code, fix = errno.EACCES, _REFUSED[errno.EACCES][1]
        why = f"access denied ({one_line(e)})"  # the store's own words: which operation, which key
    else:
        return None
    err = StorageUnwritable(f"cannot write {path}: {why}; {fix}")
    err.errno, err.path = code, path
    return err


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass  # never there, or already gone


# pyarrow's and the object stores' words for a transport failure, as opposed to a refusal (access denied, no such
# bucket) or bad bytes, which would fail the same way again.
_TRANSIENT = ("NETWORK_CONNECTION", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "REQUEST_TIMEOUT",
              "THROTTL", "Connection refused", "Connection reset", "connection was", "timed out", "Timeout",
              "HTTP 500", "HTTP 502", "HTTP 503", "HTTP 504", "Broken pipe", "Temporary failure")


def transient(e: BaseException) -> bool:
    """Whether an OSError from a storage call is a transport failure (retry) rather than a refusal."""
    text = str(e)
    return isinstance(e, (ConnectionError, TimeoutError)) or any(w.lower() in text.lower() for w in _TRANSIENT)


# "s3:/bucket" (one slash) or "s3:bucket" would otherwise be a local folder named "s3:"
_ONE_SLASH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)")
_NO_SLASH = re.compile(r"^(s3|s3a|gs|gcs|file|hdfs):(?!/)")


def one_line(e: BaseException) -> str:
    """An exception's text on one line (pyarrow's S3 errors span several)."""
    return " ".join(str(e).split())


def s3_settings() -> tuple[str | None, str | None]:
    """(endpoint URL, region) from the environment; shared by pyarrow and boto3 so both talk to one server."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return endpoint, region


def _s3(bucket_and_key: str) -> tuple[pafs.FileSystem, str]:
    # pyarrow reads credentials from the usual AWS chain; the endpoint override lets the same code talk
    # to MinIO / moto / any S3-compatible server.
    endpoint, region = s3_settings()
    kwargs = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else "https://" + endpoint)
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), bucket_and_key


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Local path, file://, s3://, gs:// (or anything pyarrow knows) -> (filesystem, path inside it)."""
    uri = os.fspath(uri)
    if not uri:
        raise StorageError("empty URI: pass a local directory or an s3:// / gs:// location")
    bad = _ONE_SLASH.match(uri) or _NO_SLASH.match(uri)
    if bad:
        rest = uri[len(bad.group(1)) + 1:].lstrip("/")
        raise StorageError(f"{uri!r} is not a URI (the scheme needs two slashes); write {bad.group(1)}://{rest}")
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split("://", 1)
    rest = rest.rstrip("/")
    authority, _, key = rest.partition("/")
    if "@" in authority:  # never echo the secret: the message shows the URI without it
        shown = f"{scheme}://***@{authority.rsplit('@', 1)[1]}/{key}"
        raise StorageError(f"{shown}: credentials in a URI end up in logs; remove them and use the environment "
                           "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or the instance role)")
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(rest)
    if scheme in ("s3", "s3a"):
        return _s3(rest)
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), rest
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise StorageError(f"unsupported URI {uri!r}: use a local path, s3://bucket/key or gs://bucket/key") from e


def ray_storage(uri: str) -> dict:
    """RunConfig(storage_path=…, storage_filesystem=…) for Ray Tune and Ray Train: our filesystem for object
    stores (so Ray's checkpoints reach the same endpoint and region as our tables), a plain path locally."""
    fs, path = resolve(uri)
    return {"storage_path": path} if is_local(fs) else {"storage_path": path, "storage_filesystem": fs}


def join(base: str, *parts: str) -> str:
    """Join a URI or filesystem path with '/' (object stores have no os.sep)."""
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def stays_inside(rel) -> bool:
    """Whether rel, a path read from a file someone else may have written, names something under the base it is
    joined to: relative, no way out through '..', not a URI."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "://" in rel:
        return False
    norm = posixpath.normpath(rel)
    return norm not in (".", "..") and not norm.startswith("../")


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise StorageError(f"cannot reach {path!r} ({one_line(e)}); check the URI, credentials and "
                           "AWS_ENDPOINT_URL") from e


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise StorageError(f"{path}: file not found; check the URI or prepare the data again") from e
    except OSError as e:
        kind = StorageUnavailable if transient(e) else StorageError
        raise kind(f"{path}: cannot read ({one_line(e)}); check the URI, credentials and AWS_ENDPOINT_URL") from e


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Local: write a temp name, fsync it, rename, fsync the folder. Object stores: one PUT is all-or-nothing.

    Without the fsyncs a power loss can leave the new name pointing at a file whose bytes never reached the disk
    (a zero-length results part or manifest on ext4/xfs): the data first, then the rename's directory entry. A write
    that fails (no space, read-only, permission) removes its temp file: readers never see part of one, and a full
    disk gets back what it had. Raises StorageUnwritable for those faults, StorageError for any other.
    """
    parent = path.rsplit("/", 1)[0]
    tmp = None
    try:
        fs.create_dir(parent, recursive=True)
        if not is_local(fs):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        if tmp is not None:
            _remove_quietly(tmp)
        raise refused_write(e, path) or StorageError(f"cannot write {path!r} ({one_line(e)}); check permissions / "
                                                     "credentials") from e


def require_absolute(uri: str | os.PathLike, flag_name: str) -> str:
    """Refuse a relative local path: Ray trials run in another working directory, where it names another folder."""
    uri = os.fspath(uri)
    resolve(uri)  # the URI checks (empty, one slash) come first
    if "://" in uri or os.path.isabs(os.path.expanduser(uri)):
        return uri
    raise StorageError(f"{flag_name} {uri!r} is a relative path, which breaks inside Ray trials (they run in another "
                       f"working directory); pass an absolute path, e.g. {flag_name} {os.path.abspath(uri)}")


def missing_dirs(uri: str | os.PathLike) -> list[str]:
    """The local folders from uri up that do not exist yet, deepest first: what writing under uri creates, for
    remove_empty_dirs to take back. [] on object stores (their folders are key prefixes, gone with their keys)."""
    fs, path = resolve(uri)
    out: list[str] = []
    while is_local(fs) and not os.path.lexists(path) and os.path.dirname(path) != path:
        out.append(path)
        path = os.path.dirname(path)
    return out


def remove_empty_dirs(dirs: list[str]) -> None:
    """Remove these folders (deepest first) while they are empty: a folder that holds anything is kept, and so
    is every folder above it."""
    for d in dirs:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            continue
        except OSError:
            return


def probe_write(uri: str | os.PathLike, size: int = 4096) -> None:
    """Write `size` bytes under uri and delete them (creating uri's folders as a write there would): raises
    StorageUnwritable when the storage refuses (no space, read-only, permission; naming uri, not the probe's name),
    StorageError on any other fault."""
    fs, path = resolve(uri)
    probe = join(path, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:
        fs.create_dir(path, recursive=True)
        if is_local(fs):
            try:
                with open(probe, "wb") as f:
                    f.write(b"\0" * size)
            finally:
                _remove_quietly(probe)
        else:
            with fs.open_output_stream(probe) as f:
                f.write(b"\0" * size)
            fs.delete_file(probe)
    except OSError as e:
        raise refused_write(e, os.fspath(uri)) or StorageError(
            f"cannot write to {os.fspath(uri)} ({one_line(e)}); fix its permissions or credentials, or pass another "
            "location") from e


def check_writable(uri: str | os.PathLike) -> None:
    """Write and delete a small probe object under uri (its folders created), so a bad output fails before any work,
    not after it. A refused one is left as it was found: the folders made for the probe are removed again."""
    made = missing_dirs(uri)
    try:
        probe_write(uri, size=5)
    except StorageError:
        remove_empty_dirs(made)
        raise
