"""Compiled programs: ``sized_jit``, and executables kept on disk between processes.

lmevi keeps every program it compiles, as an executable, in its cache folder (:mod:`lmevi.runtime.cache`): a later
process that fits a model of the same shapes loads the executable and runs it without tracing, lowering or
compiling (see "Executables kept on disk" below).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from lmevi.runtime import trust
from lmevi.runtime.cache import cache_dir
from lmevi.runtime.lapack import _link_lapack


# Programs for models up to this many (padded) rows are compiled at XLA's lowest backend optimisation level:
# on this 2-core CPU that cut compile time by 35-45 % (the coordinate-ascent loop of a sleepstudy-sized model:
# 2.0 s -> 1.3 s) while the programs ran within noise of the optimised ones, since at that size a fit is
# dominated by per-call overheads, not by arithmetic. Larger models keep the default level.
SMALL_ROWS = 1 << 14
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _rows(first) -> int:
    design = getattr(first, "design", first)
    return int(design.y.shape[0])


def sized_jit(fn=None, *, sized: bool = True, name: str | None = None, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs)`` whose compiled programs are kept as executables (see :func:`executable`).

    With ``sized`` (the default), programs for a first argument (a :class:`~lmevi.fitting.build.Problem` or a
    :class:`~lmevi.frame.design.Design`) of at most :data:`SMALL_ROWS` rows are compiled with :data:`FAST_COMPILE`.
    ``name`` (default: the function's module and qualified name) must tell the program apart from every other
    one: give it where ``fn`` wraps another function (a gradient). ``_cache_size()`` counts the distinct
    programs the function has compiled or loaded in this process."""
    if fn is None:
        return lambda f: sized_jit(f, sized=sized, name=name, **jit_kwargs)
    import functools

    import jax

    full = jax.jit(fn, **jit_kwargs)
    fast = jax.jit(fn, compiler_options=FAST_COMPILE, **jit_kwargs) if sized else full
    static = _StaticArgs.of(fn, jit_kwargs)
    name = f"{fn.__module__}.{fn.__qualname__}" if name is None else name
    seen: set = set()

    @functools.wraps(fn)
    def call(*args, **kwargs):
        small = sized and _rows(args[0]) <= SMALL_ROWS
        return executable(fast if small else full, f"{name}[{'fast' if small else 'full'}]", static, seen,
                          args, kwargs)

    call.full, call.fast = full, fast
    call._cache_size = lambda: len(seen) + full._cache_size() + (fast._cache_size() if sized else 0)
    return call


# ----------------------------------------------------------------------------------------------------
# Executables kept on disk
#
# JAX's persistent compilation cache saves XLA's compile, but a new process still traces every program to a
# jaxpr and lowers it to StableHLO to compute the cache key: on InstEval's default fit in a fresh process
# that was about 1.3 s of its 5.5 s (the CAVI start's loop 0.6 s, its starting point 0.4 s, the exact fit's
# criterion and estimates 0.4 s). lmevi therefore also keeps each compiled program itself
# (``jax.experimental.serialize_executable``) in ``<cache folder>/executables``, under a program key: the
# program's StableHLO text, its argument and result trees, the function's name (which tells the compiler
# options apart), the JAX and jaxlib versions and the devices (on CPU, the host CPU's model and instruction
# flags). A call finds it through a call key of what
# determines the program before tracing: the function, its static arguments, the tree structure (with its
# static metadata), shapes and dtypes of its array arguments, JAX's configuration, versions, devices and a
# hash of lmevi's own source files (so an edited or upgraded lmevi never takes an old program for a call). A
# later call with the same call key loads the executable without tracing anything; a call whose key is new
# (lmevi's source changed) traces and lowers, and loads the executable if the program itself is unchanged.
# Calls that cannot be keyed safely (traced arguments, a static argument or tree metadata whose text is an
# object's address), every call in a process with more than one device, and ``LMEVI_CACHE_DIR=off`` go
# through ``jax.jit`` as usual. A load that fails (a different CPU, a damaged file) removes the file and
# compiles instead.

EXECUTABLES = "executables"
EXECUTABLE_STATS = {"loaded": 0, "compiled": 0, "stored": 0, "failed_loads": 0}
_MEMORY_LIMIT = 512  # executables kept in memory per process (least recently used dropped)
_memory: "dict[str, object]" = {}
# Configuration entries that cannot change a program (logging, caches, dumps, guards) stay out of the key.
_CONFIG_IGNORED = ("cache", "log", "traceback", "dump", "pprint", "guard", "explain", "debug_leaked",
                   "distributed_debug", "verbose")


class _StaticArgs(NamedTuple):
    positions: frozenset
    names: frozenset

    @staticmethod
    def of(fn, jit_kwargs) -> "_StaticArgs":
        import inspect

        nums = jit_kwargs.get("static_argnums", ())
        names = jit_kwargs.get("static_argnames", ())
        nums = {nums} if isinstance(nums, int) else set(nums)
        names = {names} if isinstance(names, str) else set(names)
        params = list(inspect.signature(fn).parameters)
        nums |= {params.index(n) for n in names if n in params}
        names |= {params[i] for i in nums if i < len(params)}
        return _StaticArgs(frozenset(nums), frozenset(names))


def executable(jitted, name: str, static: _StaticArgs, seen: set, args: tuple, kwargs: dict):
    """Call ``jitted(*args, **kwargs)`` through a kept executable when the call can be keyed (see above)."""
    folder = _executable_dir()
    if folder is None:
        return jitted(*args, **kwargs)
    statics, (dynamic_args, dynamic_kwargs) = _split(static, args, kwargs)
    key = _key(name, statics, (dynamic_args, dynamic_kwargs))
    if key is None:
        return jitted(*args, **kwargs)
    digest, treedef = key
    compiled = _memory.pop(digest, None)
    if compiled is None:
        compiled = _load(folder, digest, treedef)
        if compiled is None:
            # Not kept for this call's key (new arguments, or lmevi's source changed): lower the program and
            # look for it by its own text, which an edit elsewhere in lmevi leaves unchanged.
            lowered = jitted.lower(*args, **kwargs)
            program = _program_digest(name, lowered)
            compiled = _load(folder, program, treedef)
            if compiled is None:
                compiled, fresh = _compile(lowered)
                if fresh:
                    _store(folder, program, compiled)
            _link(folder, digest, program)
    _memory[digest] = compiled  # most recently used last
    while len(_memory) > _MEMORY_LIMIT:
        _memory.pop(next(iter(_memory)))
    seen.add(digest)
    return compiled(*dynamic_args, **dynamic_kwargs)


_jax_cache_hits: list = []  # one entry per hit of JAX's persistent cache (counted once lmevi first compiles)


def _compile(lowered):
    """``(compiled, fresh)``: a lowered program compiled, and whether XLA compiled it here.

    An executable that JAX's persistent cache loaded must not be kept: written out again it lost part of its
    code (jaxlib 0.10 on CPU: "Function multiply_bitcast_fusion not found" when the next process ran it). So
    JAX is kept from writing these programs to its own cache (its write threshold is raised for the length of
    the compile; the programs are kept here instead), and a program JAX's cache served anyway (an entry that
    an earlier lmevi or the user's own cache holds) is used but not kept."""
    import jax

    if not _jax_cache_hits:
        _jax_cache_hits.append(0)
        jax.monitoring.register_event_listener(
            lambda event, **kw: _jax_cache_hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
    hits = len(_jax_cache_hits)
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        compiled = lowered.compile()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
    EXECUTABLE_STATS["compiled"] += 1
    return compiled, len(_jax_cache_hits) == hits


def _executable_dir():
    folder = cache_dir()
    if folder is None:
        return None
    import jax

    # One device only: a compiled executable takes its arguments exactly as placed when it was compiled (jit
    # moves them where its program wants them), and with several devices a program may want them replicated
    # or sharded (a 4-device fit failed with "Expected args ... to have 4 shards").
    if jax.config.jax_disable_jit or jax.device_count() != 1 or jax.process_count() != 1:
        return None
    folder = folder / EXECUTABLES
    if folder.exists() and not trust.check(folder):  # others could plant code in it (warned once)
        return None
    return folder


def _split(static: _StaticArgs, args: tuple, kwargs: dict) -> tuple[list, tuple[tuple, dict]]:
    """``(static values, (dynamic positional arguments, dynamic keyword arguments))`` of one call: the static
    values as ``(position or name, value)`` pairs, the dynamic ones as a compiled program takes them."""
    statics = [(i, args[i]) for i in sorted(static.positions) if i < len(args)]
    statics += sorted((k, v) for k, v in kwargs.items() if k in static.names)
    dynamic = (tuple(a for i, a in enumerate(args) if i not in static.positions),
               {k: v for k, v in kwargs.items() if k not in static.names})
    return statics, dynamic


def _key(name: str, statics: list, dynamic: tuple[tuple, dict]):
    """``(sha256 hex digest, tree structure of the dynamic arguments)`` of a call split by :func:`_split`, or
    ``None`` when the call cannot be keyed safely."""
    import hashlib

    import jax
    import numpy as np

    leaves, treedef = jax.tree.flatten(dynamic)
    signature = []
    for leaf in leaves:
        # jit compiles one program for a host array and a device array of one shape and dtype, and a compiled
        # program takes either: so does the key (there is one device, see _executable_dir)
        if isinstance(leaf, jax.Array):
            if isinstance(leaf, jax.core.Tracer) or len(leaf.sharding.device_set) != 1:
                return None
            signature.append((leaf.shape, str(leaf.dtype), bool(leaf.weak_type)))
        elif isinstance(leaf, (np.ndarray, np.generic)):
            signature.append((leaf.shape, str(leaf.dtype), False))
        elif isinstance(leaf, (bool, int, float, complex)):
            signature.append(((), type(leaf).__name__, True))
        else:
            return None
    text = repr((name, statics, str(treedef), signature, _config()))
    if " at 0x" in text:  # an object whose text is its address: no key that a later process could match
        return None
    return hashlib.sha256((_fingerprint() + _source() + text).encode()).hexdigest(), treedef


def _config() -> tuple:
    """JAX's configuration as a program sees it (64-bit types follow ``jax.enable_x64`` contexts).

    Read at every call of a kept program: the names kept are listed once per set of names, and the text of
    a set of values is remembered (at one millisecond a call, the text was a third of a small fit's
    overhead)."""
    import jax
    import numpy as np

    values = jax.config.values
    names = _config_names.get(len(values))
    if names is None or any(k not in values for k in names):
        names = tuple(k for k in sorted(values) if not any(w in k for w in _CONFIG_IGNORED))
        _config_names.clear()
        _config_names[len(values)] = names
    flt = str(jax.dtypes.canonicalize_dtype(np.float64))
    raw = (tuple(values[k] for k in names), flt)
    try:
        text = _config_text.get(raw)
    except TypeError:  # a value that cannot be hashed: its text, every time
        raw = text = None
    if text is None:
        text = tuple((k, repr(values[k])) for k in names) + (("float", flt),)
        if raw is not None:
            if len(_config_text) > 64:
                _config_text.clear()
            _config_text[raw] = text
    return text


_config_names: dict = {}
_config_text: dict = {}


_fingerprints: list = []


def _fingerprint() -> str:
    """Versions and devices: what every key of this process shares (computed once)."""
    if not _fingerprints:
        import jax
        import jaxlib

        device = jax.devices()[0]
        _fingerprints.append(repr((
            jax.__version__, jaxlib.__version__, device.platform, device.device_kind,
            getattr(device.client, "platform_version", ""), jax.device_count(), jax.process_count(),
            os.environ.get("XLA_FLAGS", ""), _host_cpu() if device.platform == "cpu" else "",
        )))
    return _fingerprints[0]


def _host_cpu() -> str:
    """The host CPU's model and instruction-set flags (Linux), so that a cache folder shared by machines of
    different CPUs (a home folder on a cluster) never hands one of them code compiled for another's
    instructions; elsewhere ``platform.processor()``."""
    import hashlib
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        text = "".join(sorted(set(lines)))
    except OSError:
        text = platform.processor()
    return platform.machine() + ":" + hashlib.sha256(text.encode()).hexdigest()[:16]


_sources: list = []


def _source() -> str:
    """A hash of lmevi's own source files (computed once): part of every call key, not of program keys."""
    if not _sources:
        import hashlib

        source = hashlib.sha256()
        root = Path(__file__).parents[1]  # src/lmevi, every layer
        for path in sorted(root.rglob("*.py")):
            source.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
        _sources.append(source.hexdigest())
    return _sources[0]


def _program_digest(name: str, lowered) -> str:
    """A key of the program itself: its StableHLO text (without source locations), the function's name (which
    tells the compiler options apart), its argument and result trees, and the process's versions and devices
    (:func:`_fingerprint`), but not lmevi's source."""
    import hashlib

    text = repr((name, str(lowered.in_tree), str(lowered.out_tree))) + lowered.as_text()
    return hashlib.sha256((_fingerprint() + text).encode()).hexdigest()


def _link(folder: Path, digest: str, program: str) -> None:
    """Record that a call key ``digest`` runs the program kept as ``program`` (a small text file)."""
    if digest == program:
        return
    try:
        (folder / f"{digest}.key").write_text(program)
    except OSError:
        pass


def _load(folder: Path, digest: str, treedef):
    """The executable kept under ``digest`` (directly, or through a link of :func:`_link`) if it exists, loads
    and takes arguments of ``treedef``; else ``None``."""
    import pickle

    path = folder / f"{digest}.bin"
    if not path.exists():
        link = folder / f"{digest}.key"
        try:
            path = folder / f"{link.read_text().strip()}.bin"
        except OSError:
            return None
        if not path.exists():
            return None
    if not trust.check(path):  # pickle.loads runs code: only a file no one else could have written
        return None
    try:
        from jax.experimental import serialize_executable

        _link_lapack()
        payload, in_tree, out_tree = pickle.loads(path.read_bytes())
        if in_tree != treedef:
            raise ValueError("argument structure differs")
        compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except Exception:  # noqa: BLE001 - any failure to load means: compile instead (and keep that)
        EXECUTABLE_STATS["failed_loads"] += 1
        try:
            path.unlink()
        except OSError:
            pass
        return None
    EXECUTABLE_STATS["loaded"] += 1
    return compiled


def _store(folder: Path, digest: str, compiled) -> None:
    """Write ``compiled`` to ``folder/<digest>.bin`` (atomically); a folder that cannot be written is skipped."""
    import pickle
    import tempfile

    try:
        from jax.experimental import serialize_executable

        data = pickle.dumps(serialize_executable.serialize(compiled))
        trust.private_dir(folder)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as f:
            f.write(data)
        try:
            os.replace(f.name, folder / f"{digest}.bin")
        finally:
            if os.path.exists(f.name):
                os.unlink(f.name)
    except Exception:  # noqa: BLE001 - an executable that cannot be kept is compiled again next time
        return
    EXECUTABLE_STATS["stored"] += 1
