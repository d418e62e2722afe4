"""``meshscale://``: mesh objects as an fsspec filesystem, so pandas, pyarrow, Dask and
every other fsspec user read and write them with their usual calls::

    pd.read_parquet("meshscale://sales/2026-12-01.parquet",
                    storage_options={"address": "127.0.0.1:7946", "bundle": "client/"})

A path is a *name* or an object id. A name (``sales/2026-12-01.parquet``) is the KV key
``fs/<name>`` (``NAME_PREFIX``), whose value points at the object holding its bytes
(``{"id": "b3-...", "size": N}``, or a bare id set by hand with ``meshscale kv put``);
``meshscale://b3-<64 hex>`` is the object itself. Names are immutable objects under
mutable references: writing a name puts a new object (``put`` on close, with the policy
given as storage options or ``open`` keyword arguments: ``replicas``, ``w``,
``data_class``, ``residency``) and then binds the name to it; ``rm`` of a name unbinds
it (its object stays until deleted by id, as another name may share it: equal bytes are
one object); ``rm`` of an id deletes the object. Directories are name prefixes up to a
``/``: they exist while a name lies under them.

Reads of a range (``cat_file(path, start, end)``, a file's reads) are served by the
node's chunk reads at those offsets (``Mesh.read_range``), never a whole download; unlike
a whole read (``cat_file(path)``, ``get``) they cannot be checked against the id, which
hashes the whole object.

Connection: storage options ``address`` (``HOST:PORT``), ``bundle`` (a client bundle
directory), ``mesh`` (a ``mesh.json`` of ``meshscale up``), ``token``, ``timeout``; what
is not given comes from ``MESHSCALE_MESH`` and ``MESHSCALE_BUNDLE`` as for the CLI
(``meshfile.resolve_target``). Importing this module registers the protocol with fsspec;
an installed meshscale also names it as an ``fsspec.specs`` entry point.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from meshscale.client.mesh import (
    ConnectError,
    Mesh,
    ObjectNotFoundError,
    _check_policy,
    connect,
)
from meshscale.core.api.objects import MAX_OBJECT_BYTES
from meshscale.core.objects import OBJECT_ID_RE
from meshscale.meshfile import MeshFileError, resolve_target

__all__ = ["NAME_PREFIX", "MeshFileSystem", "MeshWriteFile", "expand"]

PROTOCOL: Final = "meshscale"
NAME_PREFIX: Final = "fs/"
"""KV keys of names: ``fs/<name>`` holds the object a name points at."""
SPOOL_BYTES: Final = 16 * 1024 * 1024
"""A file being written stays in memory up to this many bytes, then in a temp file."""
POLICY_OPTIONS: Final = ("replicas", "w", "data_class", "residency")
CONNECT_OPTIONS: Final = ("address", "bundle", "mesh", "token", "timeout")
FSSPEC_OPTIONS: Final = ("skip_instance_cache", "use_listings_cache", "listings_expiry_time",
                         "max_paths", "asynchronous", "loop")
"""fsspec's own instance options, passed on to ``AbstractFileSystem``."""


def _policy(options: dict[str, Any]) -> dict[str, Any]:
    """The put policy in ``options`` (replicas, w, data_class, residency), checked as a
    put checks it; ``ValueError`` naming the option if it is bad."""
    data_class = options.get("data_class")
    # With a data class, what is left out comes from the class's policy at the node.
    replicas = options.get("replicas", None if data_class is not None else 3)
    w = options.get("w", min(2, replicas) if isinstance(replicas, int) else
                    None if data_class is not None else 2)
    residency = options.get("residency")
    if isinstance(residency, str):
        residency = [residency]
    replicas, w, regions = _check_policy(replicas, w, data_class, residency)
    return {"replicas": replicas, "w": w, "data_class": data_class, "residency": regions}


def _pointer(value: bytes) -> tuple[str, int | None]:
    """(object id, size if known) from a name's KV value."""
    text = value.decode("utf-8", "replace").strip()
    if OBJECT_ID_RE.fullmatch(text):
        return text, None
    try:
        got = json.loads(text)
        oid, size = got["id"], got.get("size")
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"not a name's value: {text!r:.100}") from None
    if not isinstance(oid, str) or OBJECT_ID_RE.fullmatch(oid) is None:
        raise ValueError(f"not a name's value: {text!r:.100}")
    return oid, size if isinstance(size, int) and size >= 0 else None


class MeshFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """The mesh's objects and names as an fsspec filesystem (see the module docstring)."""

    protocol = PROTOCOL
    root_marker = ""

    def __init__(self, *args: Any, **options: Any) -> None:
        unknown = sorted(k for k in options
                         if k not in CONNECT_OPTIONS + POLICY_OPTIONS + FSSPEC_OPTIONS)
        if args or unknown:
            what = ", ".join(repr(k) for k in unknown) if unknown else f"{len(args)} positional"
            raise TypeError(f"meshscale:// takes no storage option {what}; it takes "
                            f"{', '.join(CONNECT_OPTIONS + POLICY_OPTIONS)}")
        super().__init__(**{k: v for k, v in options.items() if k in FSSPEC_OPTIONS})
        self.policy = _policy(options)
        timeout = options.get("timeout", 30.0)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"meshscale:// storage option timeout must be seconds > 0, "
                             f"not {timeout!r}")
        address = options.get("address")
        if address is not None and not isinstance(address, str):
            raise ValueError(f"meshscale:// storage option address is HOST:PORT, "
                             f"not {address!r:.100}")
        bundle, mesh = options.get("bundle"), options.get("mesh")
        try:
            target = resolve_target(
                address, None if mesh is None else Path(mesh),
                None if bundle is None else Path(bundle),
                missing_bundle="meshscale:// needs a client bundle: pass storage_options="
                               "{'bundle': DIR} (or 'mesh': mesh.json), or set "
                               "MESHSCALE_BUNDLE or MESHSCALE_MESH")
        except MeshFileError as e:
            raise ConnectError(str(e)) from None
        self.mesh: Mesh = self._connect(target.addresses, target.bundle, options.get("token"),
                                        float(timeout))
        self.bytes_read = 0
        """Bytes this instance's range reads returned (a whole ``cat_file`` not counted)."""

    @staticmethod
    def _connect(addresses: Sequence[str], bundle: Path, token: str | None,
                 timeout: float) -> Mesh:
        """The first of ``addresses`` that answers (``ConnectError`` naming the last
        failure if none does)."""
        last: ConnectError | None = None
        for addr in addresses:
            try:
                return connect(addr, bundle=bundle, token=token, timeout=timeout)
            except ConnectError as e:
                last = e
        assert last is not None
        raise ConnectError(f"meshscale://: {last}")

    # -- paths

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(super()._strip_protocol(path))
        return path.strip("/")

    @staticmethod
    def is_id(path: str) -> bool:
        return OBJECT_ID_RE.fullmatch(path) is not None

    def _key(self, path: str) -> str:
        return NAME_PREFIX + str(self._strip_protocol(path))

    def resolve(self, path: str) -> tuple[str, int | None]:
        """(object id, size if the name says) of ``path``; ``FileNotFoundError`` naming
        the path if it names no object."""
        p = self._strip_protocol(path)
        if self.is_id(p):
            return p, None
        if not p:
            raise IsADirectoryError("meshscale://: the root is a directory, not an object")
        value = self.mesh.kv.get(self._key(p), binary=True)
        if value is None:
            raise FileNotFoundError(f"meshscale://{p}: no such name (KV key {self._key(p)!r})")
        try:
            return _pointer(value)
        except ValueError as e:
            raise FileNotFoundError(f"meshscale://{p}: {e}") from None

    def _names(self, prefix: str) -> list[tuple[str, bytes]]:
        return [(k[len(NAME_PREFIX):], v) for k, v in self.mesh.kv.items(NAME_PREFIX + prefix,
                                                                       binary=True)]

    # -- metadata

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """Size, id, holders (live nodes with a copy), replicas and data class of a name
        or id; a directory for a prefix that names lie under."""
        p = self._strip_protocol(path)
        if not p:
            return {"name": "", "size": 0, "type": "directory"}
        try:
            oid, _ = self.resolve(p)
        except FileNotFoundError:
            if not self.is_id(p) and self.mesh.kv.keys(self._key(p) + "/", limit=1):
                return {"name": p, "size": 0, "type": "directory"}
            raise
        try:
            st = self.mesh.stat(oid)
        except ObjectNotFoundError:
            raise FileNotFoundError(f"meshscale://{p}: object {oid} is not held by any live "
                                    "node") from None
        return {"name": p, "size": st.size, "type": "file", "id": oid,
                "holders": list(st.holders), "replicas": st.replicas,
                "data_class": st.data_class,
                "residency": None if st.residency is None else list(st.residency)}

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """Names and directories directly under ``path`` (by KV prefix); a name lists
        itself. Sizes come from the names' values (no node is asked per entry)."""
        p = self._strip_protocol(path)
        entries: dict[str, dict[str, Any]] = {}
        prefix = f"{p}/" if p else ""
        for name, value in self._names(prefix):
            rest = name[len(prefix):]
            if "/" in rest:
                d = prefix + rest.split("/", 1)[0]
                entries.setdefault(d, {"name": d, "size": 0, "type": "directory"})
                continue
            try:
                oid, size = _pointer(value)
            except ValueError:
                continue
            entries[name] = {"name": name, "size": size, "type": "file", "id": oid}
        if not entries and p:
            if self.is_id(p) or self.mesh.kv.get(self._key(p), binary=True) is not None:
                info = self.info(p)
                return [info] if detail else [info["name"]]
            raise FileNotFoundError(f"meshscale://{p}: no such name or directory")
        rows = [entries[k] for k in sorted(entries)]
        return rows if detail else [r["name"] for r in rows]

    # -- reads

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        """The bytes of ``path``, or of ``[start, end)`` (negative: from the end) read
        with the node's chunk reads at those offsets."""
        oid, size = self.resolve(path)
        try:
            if start is None and end is None:
                return self.mesh.get(oid)  # verified against the id
            if size is None and ((start or 0) < 0 or (end or 0) < 0):
                size = int(self.info(path)["size"])
            lo = start or 0
            if lo < 0:
                assert size is not None
                lo = max(0, size + lo)
            if end is None:
                length = MAX_OBJECT_BYTES  # to the object's end (a read stops there)
            else:
                assert size is not None or end >= 0
                length = (end if end >= 0 else size + end) - lo  # type: ignore[operator]
            data = self.mesh.read_range(oid, lo, length) if length > 0 else b""
            self.bytes_read += len(data)
            return data
        except ObjectNotFoundError:
            raise FileNotFoundError(f"{path}: object {oid} is not held by any live "
                                    "node") from None

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None,
              autocommit: bool = True, cache_options: dict[str, Any] | None = None,
              **kwargs: Any) -> AbstractBufferedFile:
        p = self._strip_protocol(path)
        if mode == "rb":
            oid, size = self.resolve(p)
            if size is None:
                size = self.info(p)["size"]
            return MeshReadFile(self, p, oid, size, block_size=block_size,
                                cache_options=cache_options,
                                cache_type=kwargs.get("cache_type", "readahead"))
        if mode not in ("wb", "xb"):
            raise ValueError(f"meshscale://{p}: mode {mode!r} is not supported "
                             "(rb, wb or xb: objects are immutable, there is no append)")
        if not p or self.is_id(p):
            raise ValueError(f"meshscale://{p}: write to a name, not an object id "
                             "(an id is the hash of its bytes)")
        if mode == "xb" and self.mesh.kv.get(self._key(p), binary=True) is not None:
            raise FileExistsError(f"meshscale://{p}: the name exists")
        policy = _policy({**self.policy, **{k: kwargs[k] for k in POLICY_OPTIONS if k in kwargs}})
        return MeshWriteFile(self, p, policy, block_size=block_size)

    # -- writes

    def bind(self, path: str, ref_id: str, size: int) -> None:
        """Point the name ``path`` at the object ``ref_id`` (of ``size`` bytes)."""
        p = self._strip_protocol(path)
        if not p or self.is_id(p):
            raise ValueError(f"meshscale://{p}: not a name")
        self.mesh.kv.put(self._key(p), json.dumps({"id": ref_id, "size": size},
                                                  separators=(",", ":")))
        self.invalidate_cache()

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite",
                  **kwargs: Any) -> None:
        p = self._strip_protocol(path)
        if not p or self.is_id(p):
            raise ValueError(f"meshscale://{p}: write to a name, not an object id")
        policy = _policy({**self.policy, **{k: kwargs[k] for k in POLICY_OPTIONS if k in kwargs}})
        ref = self.mesh.put(value, **policy)
        self.bind(p, ref.id, ref.size)

    def _rm(self, path: str) -> None:
        """A name: unbind it (its object stays: another name may point at it); an id:
        delete the object everywhere."""
        p = self._strip_protocol(path)
        if self.is_id(p):
            try:
                self.mesh.delete(p)
            except ObjectNotFoundError:
                raise FileNotFoundError(f"meshscale://{p}: no live node holds it") from None
        else:
            if self.mesh.kv.get(self._key(p), binary=True) is None:
                raise FileNotFoundError(f"meshscale://{p}: no such name")
            self.mesh.kv.delete(self._key(p))
        self.invalidate_cache()

    def rm_file(self, path: str) -> None:
        self._rm(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """``_rm`` of each path (``FileNotFoundError`` for one that names nothing); with
        ``recursive``, of every name under a directory."""
        for p in [path] if isinstance(path, str) else list(path):
            s = self._strip_protocol(p)
            if recursive and s and not self.is_id(s) and self.isdir(s):
                for name in self.find(s, maxdepth=maxdepth):
                    self._rm(name)
            else:
                self._rm(s)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Directories are name prefixes: nothing to make."""

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Directories are name prefixes: nothing to make."""

    def rmdir(self, path: str) -> None:
        """Directories are name prefixes: nothing to remove."""

    def close(self) -> None:
        """Close the connection (fsspec keeps instances cached: clear_instance_cache)."""
        self.mesh.close()


class MeshReadFile(AbstractBufferedFile):  # type: ignore[misc]
    """A name or object opened for reading: each block fetched is one range read."""

    def __init__(self, fs: MeshFileSystem, path: str, oid: str, size: int, *,
                 block_size: int | None, cache_options: dict[str, Any] | None,
                 cache_type: str) -> None:
        self.oid = oid
        super().__init__(fs, path, mode="rb", block_size=block_size or "default",
                         cache_type=cache_type, cache_options=cache_options, size=size)

    def _fetch_range(self, start: int, end: int) -> bytes:
        fs: MeshFileSystem = self.fs
        if end <= start:
            return b""
        data = fs.mesh.read_range(self.oid, start, end - start)
        fs.bytes_read += len(data)
        return data


class MeshWriteFile(AbstractBufferedFile):  # type: ignore[misc]
    """A name being written: bytes spool here (memory, then a temp file beyond
    ``SPOOL_BYTES``); closing puts them as one object and binds the name to it."""

    def __init__(self, fs: MeshFileSystem, path: str, policy: dict[str, Any], *,
                 block_size: int | None) -> None:
        self.policy = policy
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES,  # noqa: SIM115
                                                   prefix="meshscale-fs-")
        super().__init__(fs, path, mode="wb", block_size=block_size or "default")

    def _initiate_upload(self) -> None:
        """Nothing to start: the put happens on close, once the size is known."""

    def _upload_chunk(self, final: bool = False) -> bool:
        self.spool.write(self.buffer.getbuffer())
        if final:
            fs: MeshFileSystem = self.fs
            try:
                self.spool.seek(0)
                ref = fs.mesh.put(self.spool, **self.policy)  # type: ignore[arg-type]
            finally:
                self.spool.close()
            fs.bind(self.path, ref.id, ref.size)
        return True

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.spool.close()
        super().discard()


def expand(mesh: Mesh, paths: Sequence[str], limit: int) -> list[tuple[str, str]]:
    """``(path, object id)`` of each object ``paths`` name, in order, without duplicates:
    ``meshscale://`` (or bare) object ids, names, and directories (every name under the
    prefix, sorted). ``FileNotFoundError`` naming a path that names nothing,
    ``ValueError`` past ``limit`` objects."""
    out: dict[str, str] = {}
    for raw in paths:
        if not isinstance(raw, str):
            raise ValueError(f"a meshscale:// path or object id, not {raw!r:.80}")
        p = str(MeshFileSystem._strip_protocol(raw))
        if not p:
            raise ValueError("the meshscale:// root is every name: name a directory")
        found: list[tuple[str, str]] = []
        if OBJECT_ID_RE.fullmatch(p):
            found.append((f"{PROTOCOL}://{p}", p))
        else:
            value = mesh.kv.get(NAME_PREFIX + p, binary=True)
            if value is not None:
                try:
                    found.append((f"{PROTOCOL}://{p}", _pointer(value)[0]))
                except ValueError as e:
                    raise FileNotFoundError(f"meshscale://{p}: {e}") from None
            else:
                for name, v in sorted(mesh.kv.items(NAME_PREFIX + p + "/", binary=True)):
                    with contextlib.suppress(ValueError):
                        found.append((f"{PROTOCOL}://{name[len(NAME_PREFIX):]}",
                                      _pointer(v)[0]))
        if not found:
            raise FileNotFoundError(f"meshscale://{p}: no such name, directory or object id")
        for path, oid in found:
            out.setdefault(path, oid)
            if len(out) > limit:
                raise ValueError(f"more than {limit} objects under {', '.join(paths)}")
    return list(out.items())


fsspec.register_implementation(PROTOCOL, MeshFileSystem, clobber=True)
