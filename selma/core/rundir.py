"""The run directory: where stages exchange data, and the manifest that says what is finished.

A run directory is a local path or any URI pyarrow understands (``s3://``, ``gs://``, ``hdfs://``).
Contracts (see DESIGN.md)::

    RUN/run.json                  manifest: config, per-stage status and hash, counts, timings
    RUN/prompts/<skill>/*.parquet
    RUN/images/<skill>/*.parquet
    RUN/experts/<skill>/          diffusers-format LoRA
    RUN/merged/                   merged LoRA + merge.json

Every data file is written under a temporary name and moved into place, so a reader never sees a
half-written file. A stage counts as finished only once ``run.json`` marks it ``committed``; the
manifest is written last, atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from selma.core.errors import InputError
from selma.core.models import build_once, cache_dir

MANIFEST = "run.json"
LOCK_FILE = ".lock"
LEASE_FILE = ".lock.json"
MANIFEST_LOCK_WAIT_S = 30.0
STAGES = ("prompts", "images", "train", "merge")


class RunDirError(InputError):
    """The run directory cannot be used as asked; the message names the run or the file at fault."""


class RunDirInUse(RunDirError):
    """Another command holds the run directory's lock."""


def _split_uri(uri: str) -> tuple[pafs.FileSystem, str, str]:
    if "://" not in uri:
        local = str(Path(uri).expanduser().resolve())
        return pafs.LocalFileSystem(), local, local
    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        # Schemes pyarrow lacks natively (memory://, az://, ...) go through fsspec when installed.
        import fsspec  # optional: fsspec is no selma dependency

        fs, root = fsspec.core.url_to_fs(uri)
        filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    return filesystem, root.rstrip("/"), uri.rstrip("/")


class RunDir:
    def __init__(self, uri: str):
        self.fs, self.root, self.uri = _split_uri(uri)
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    # paths ---------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path (without scheme) of a location inside the run."""
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        """The full URI (with scheme) of a location inside the run, for Ray Data / Ray Train."""
        return "/".join([self.uri, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def list_dirs(self, *parts: str) -> list[str]:
        if not self.exists(*parts):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts)))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and not _hidden(i.base_name))

    def list_files(self, *parts: str, suffix: str = ".parquet") -> list[str]:
        """Finished data files below a location (temporary and hidden files excluded)."""
        if not self.exists(*parts):
            return []
        selector = pafs.FileSelector(self.path(*parts), recursive=True)
        found = []
        for info in self.fs.get_file_info(selector):
            relative = info.path[len(self.root) + 1 :]
            if info.type == pafs.FileType.File and info.path.endswith(suffix) and not any(
                _hidden(piece) for piece in relative.split("/")
            ):
                found.append(info.path)
        return sorted(found)

    # atomic writes -------------------------------------------------------------------------
    def write_bytes(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.is_local:  # an object store's PUT is atomic already; a "move" would copy it
            with self.fs.open_output_stream(target) as stream:
                stream.write(data)
            return
        temporary = f"{parent}/.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(temporary) as stream:
                stream.write(data)
            self.fs.move(temporary, target)
        except BaseException:
            self.delete_quietly(temporary)
            raise

    def delete_quietly(self, path: str) -> None:
        try:
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir(path)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(path)
        except OSError:
            pass

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as stream:
            return stream.read()

    def write_json(self, relative: str, obj: Any) -> None:
        self.write_bytes(relative, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def read_json(self, relative: str) -> Any:
        try:
            return json.loads(self.read_bytes(relative))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunDirError(f"{self.uri_of(relative)}: not valid JSON ({err}); restore it from a backup, "
                              "or start a new run directory") from None

    @contextmanager
    def reading_parquet(self, path: str) -> Iterator[None]:
        """Reading Parquet file ``path`` of the run: a damaged file raises :class:`RunDirError`
        naming it and the command that redoes its rows."""
        try:
            yield
        except (pa.ArrowInvalid, OSError) as err:
            stage = path[len(self.root) + 1:].split("/", 1)[0]
            raise RunDirError(f"{path}: not a readable Parquet file ({err}); delete it and rerun "
                              f"`selma {stage if stage in STAGES else 'run'}` to redo its rows") from None

    def read_parquet(self, path: str, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file of the run (a path from :meth:`list_files`)."""
        with self.reading_parquet(path):
            return pq.read_table(path, filesystem=self.fs, columns=columns)

    def parquet_rows(self, path: str) -> int:
        with self.reading_parquet(path):
            return pq.read_metadata(path, filesystem=self.fs).num_rows

    def write_table(self, relative: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(relative, sink.getvalue().to_pybytes())

    def read_table(self, *parts: str, columns: list[str] | None = None) -> pa.Table | None:
        """All finished Parquet files below a location as one table (None when there are none)."""
        files = self.list_files(*parts)
        if not files:
            return None
        tables = [self.read_parquet(f, columns) for f in files]
        return pa.concat_tables(tables, promote_options="default")

    # directories ---------------------------------------------------------------------------
    def put_dir(self, local_dir: str | Path, relative: str, keep: tuple[str, ...] = ()) -> None:
        """Copy a local directory into the run, replacing ``relative`` as a whole at the end, but
        for its subfolders named in ``keep`` (written earlier, e.g. an expert's checkpoints).

        Object stores cannot rename a directory: there the old copy is deleted and the files are
        written in place (each object appears whole); the stage's commit in run.json is what says
        the directory is complete.
        """
        clash = [name for name in keep if (Path(local_dir) / name).exists()]
        if clash:
            raise ValueError(f"put_dir: {local_dir} holds {clash}, which {relative} keeps")
        if not self.is_local:
            if self.exists(relative):
                for info in self.fs.get_file_info(pafs.FileSelector(self.path(relative))):
                    if info.base_name not in keep:
                        (self.fs.delete_dir if info.type == pafs.FileType.Directory else self.fs.delete_file)(info.path)
            pafs.copy_files(str(local_dir), self.path(relative), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
            return
        parent = relative.rsplit("/", 1)[0] if "/" in relative else ""
        staging = f"{parent}/.tmp-{uuid.uuid4().hex}".lstrip("/")
        try:
            self.makedirs(staging)
            pafs.copy_files(str(local_dir), self.path(staging), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
            for name in keep:
                if self.exists(relative, name):
                    self.fs.move(self.path(relative, name), self.path(staging, name))
            if self.exists(relative):
                self.fs.delete_dir(self.path(relative))
            self.fs.move(self.path(staging), self.path(relative))
        except BaseException:
            for name in keep:  # give back what was moved aside
                if self.exists(staging, name) and not self.exists(relative, name):
                    self.makedirs(relative)
                    self.fs.move(self.path(staging, name), self.path(relative, name))
            self.delete_quietly(self.path(staging))
            raise

    def get_dir(self, relative: str, local_dir: str | Path) -> Path:
        local_dir = Path(local_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(relative), str(local_dir), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local_dir

    @contextmanager
    def local_copy(self, relative: str) -> Iterator[Path]:
        """A local path for a directory of the run (the directory itself when the run is local)."""
        if self.is_local:
            yield Path(self.path(relative))
            return
        with tempfile.TemporaryDirectory(prefix="selma-") as tmp:
            yield self.get_dir(relative, tmp)

    # manifest ------------------------------------------------------------------------------
    def manifest(self) -> dict:
        if not self.exists(MANIFEST):
            return {"stages": {}}
        return self.read_json(MANIFEST)

    def stage(self, name: str) -> dict:
        return self.manifest().get("stages", {}).get(name, {})

    @contextmanager
    def _editing_manifest(self) -> Iterator[None]:
        """A read-modify-write of run.json: under the run's lock (free inside a command, which
        holds it; else waited for briefly) and, within this process, one thread at a time."""
        with self.lock("a run.json update", wait_s=MANIFEST_LOCK_WAIT_S), _manifest_guard(self.uri):
            yield

    def update_manifest(self, **fields: Any) -> dict:
        with self._editing_manifest():
            manifest = self.manifest()
            manifest.update(fields)
            self.write_json(MANIFEST, manifest)
            return manifest

    def update_stage(self, name: str, **fields: Any) -> dict:
        with self._editing_manifest():
            manifest = self.manifest()
            entry = manifest.setdefault("stages", {}).setdefault(name, {})
            entry.update(fields)
            self.write_json(MANIFEST, manifest)
            return entry

    def is_committed(self, name: str, *config_hashes: str) -> bool:
        """Whether stage ``name`` was committed under one of ``config_hashes``."""
        entry = self.stage(name)
        return entry.get("status") == "committed" and entry.get("config_hash") in config_hashes

    def check_stage_config(self, name: str, config_hash: str, *earlier_hashes: str) -> None:
        """Refuse to mix rows made under another config into a stage of this run; a stage begun
        under one of ``earlier_hashes`` (the same config, hashed as an earlier selma did) is this config's."""
        entry = self.stage(name)
        recorded = entry.get("config_hash")
        if recorded and recorded not in (config_hash, *earlier_hashes):
            raise RunDirError(
                f"{self.uri}: stage {name!r} was {'committed' if entry.get('status') == 'committed' else 'started'} "
                f"with a different config (hash {recorded}, now {config_hash}). Use a new --run-dir, "
                f"or `selma {name} ... --restart` to discard it and everything after it."
            )

    def begin_stage(self, name: str, config_hash: str | None, *earlier_hashes: str) -> None:
        """Mark ``name`` running; with a ``config_hash``, refuse rows made under another config
        (one of ``earlier_hashes`` is this config's, hashed as an earlier selma did)."""
        if config_hash is not None:
            self.check_stage_config(name, config_hash, *earlier_hashes)
        entry = self.stage(name)
        self.update_stage(
            name,
            status="running",
            **({"config_hash": config_hash} if config_hash is not None else {}),
            started_at=(entry.get("started_at") if entry.get("status") in ("running", "failed") else None) or time.time(),
            attempts=entry.get("attempts", 0) + 1,
        )

    def fail_stage(self, name: str, error: BaseException) -> None:
        """Record why a stage stopped; its committed rows stay, and a rerun resumes it."""
        reason = str(error) or type(error).__name__
        self.update_stage(name, status="failed", failed_at=time.time(),
                          error=f"{type(error).__name__}: {reason}"[:2000])

    def commit_stage(self, name: str, **fields: Any) -> None:
        entry = self.stage(name)
        now = time.time()
        self.update_stage(name, status="committed", finished_at=now,
                          seconds=round(now - entry.get("started_at", now), 3), **fields)

    def discard_stage(self, name: str, outputs: tuple[str, ...] | list[str]) -> None:
        """Forget a stage and delete the folders it writes, its work area and its error records."""
        for location in (*outputs, f"_work/{name}", f"errors/{name}"):
            if self.exists(location):
                self.fs.delete_dir(self.path(location))
        with self._editing_manifest():
            manifest = self.manifest()
            manifest.get("stages", {}).pop(name, None)
            self.write_json(MANIFEST, manifest)

    # one writer ----------------------------------------------------------------------------
    @contextmanager
    def lock(self, command: str | None = None, wait_s: float = 0.0) -> Iterator[None]:
        """Hold the run directory for one writer for the duration of the block.

        A local run takes an advisory ``flock`` on ``RUN/.lock``: the kernel releases it when the
        holder exits, however it exits. An object store has no locks, so a lease object
        ``RUN/.lock.json`` is written and renewed while held; one that expired, or whose holder on
        this host is gone, is taken over. Another holder (after ``wait_s`` seconds of retrying)
        raises :class:`RunDirInUse` naming its PID, host, start time and command. Re-entrant
        within a process: a command holds it throughout, and its manifest updates nest inside.
        """
        with _HELD_GUARD:
            held = _HELD.get(self.uri)
            if held is not None:
                held[1] += 1
        if held is None:
            deadline = time.monotonic() + wait_s
            while True:
                lock = _FileLock(self) if self.is_local else _Lease(self)
                try:
                    lock.acquire(_holder(command))
                    break
                except RunDirInUse:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.02 if self.is_local else 1.0)
            with _HELD_GUARD:
                held = _HELD[self.uri] = [lock, 1]
        try:
            yield
        finally:
            with _HELD_GUARD:
                held[1] -= 1
                if held[1] == 0:
                    _HELD.pop(self.uri, None)
                    held[0].release()


_HELD: dict[str, list] = {}  # run uri -> [lock, depth] for the locks this process holds
_HELD_GUARD = threading.Lock()
_MANIFEST_GUARDS: dict[str, threading.Lock] = {}


def _manifest_guard(uri: str) -> threading.Lock:
    """Serialises this process's read-modify-writes of one manifest (the run lock keeps others out)."""
    with _HELD_GUARD:
        return _MANIFEST_GUARDS.setdefault(uri, threading.Lock())


def _holder(command: str | None) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command or " ".join(["selma", *sys.argv[1:]])[:300]}


def _in_use(run: RunDir, holder: dict | None) -> RunDirInUse:
    if not holder:
        who = "another process"
    else:
        who = f"PID {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} ({holder.get('command')})"
    return RunDirInUse(f"{run.uri}: run directory in use by {who}; wait for it to finish or stop it. "
                       "One command writes to a run directory at a time.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _FileLock:
    """``flock`` on RUN/.lock; the file holds the holder's description while it is held."""

    def __init__(self, run: RunDir):
        self.run, self.path, self.fd = run, run.path(LOCK_FILE), None

    def acquire(self, holder: dict) -> None:
        self.run.makedirs()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                current = json.loads(os.pread(fd, 65536, 0) or b"null")
            except ValueError:
                current = None
            os.close(fd)
            raise _in_use(self.run, current) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


class _Lease:
    """A lease object RUN/.lock.json, renewed every ``renew_s`` while held and valid ``ttl_s``.

    Object stores have no compare-and-swap that pyarrow exposes, so after writing its lease a
    holder waits ``settle_s`` and reads it back: of two commands racing for a free run, the one
    whose write landed last keeps it, the other gets :class:`RunDirInUse`.
    """

    ttl_s, renew_s, settle_s = 120.0, 30.0, 1.0

    def __init__(self, run: RunDir):
        self.run, self.token = run, uuid.uuid4().hex
        self.stop = threading.Event()
        self.renewer: threading.Thread | None = None
        self.holder: dict = {}

    def _current(self) -> dict | None:
        if not self.run.exists(LEASE_FILE):
            return None
        try:
            return json.loads(self.run.read_bytes(LEASE_FILE))
        except (ValueError, OSError):
            return None  # a damaged lease protects nothing

    def _stale(self, lease: dict) -> bool:
        if float(lease.get("expires_at", 0)) < time.time():
            return True
        return lease.get("host") == socket.gethostname() and not _pid_alive(int(lease.get("pid", -1)))

    def _write(self) -> None:
        self.run.write_json(LEASE_FILE, {**self.holder, "token": self.token, "expires_at": time.time() + self.ttl_s})

    def acquire(self, holder: dict) -> None:
        current = self._current()
        if current is not None and not self._stale(current):
            raise _in_use(self.run, current)
        self.holder = holder
        self._write()
        time.sleep(self.settle_s)
        current = self._current()
        if current is None or current.get("token") != self.token:
            raise _in_use(self.run, current)
        self.renewer = threading.Thread(target=self._renew, name="selma-run-lease", daemon=True)
        self.renewer.start()

    def _renew(self) -> None:
        while not self.stop.wait(self.renew_s):
            try:
                self._write()
            except OSError:
                pass  # retried at the next period; the lease stays valid for ttl_s

    def release(self) -> None:
        self.stop.set()
        if self.renewer is not None:
            self.renewer.join()
        current = self._current()
        if current is not None and current.get("token") == self.token:
            self.run.delete_quietly(self.run.path(LEASE_FILE))


def _hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def new_part_name(prefix: str = "part") -> str:
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"


def local_folder(uri: str) -> str:
    """A local path holding the folder at ``uri`` (a local path is returned as it is).

    A remote folder (e.g. ``s3://bucket/run/merged``) is copied once into ``$SELMA_CACHE/remote/``,
    under a name that changes when any of its files does, so every process on a node (Serve
    replicas, eval actors) loads LoRA adapters from local disk.
    """
    if "://" not in uri:
        return uri

    filesystem, root = pafs.FileSystem.from_uri(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    listing = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    if not listing:
        raise RunDirError(f"{uri} holds no files")
    key = hashlib.sha256(json.dumps([uri, listing], default=str).encode()).hexdigest()[:16]
    target = cache_dir() / "remote" / f"{root.rstrip('/').rsplit('/', 1)[-1]}-{key}"

    def copy(folder: Path) -> None:
        pafs.copy_files(root, str(folder), source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem())

    return str(build_once(target, copy))
