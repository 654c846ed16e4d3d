"""Compilation-cache trust (:mod:`lmevi.runtime.trust` and its use in :mod:`lmevi.runtime`): a folder or file
that someone else owns or could write to is never read, so a pickle planted there never runs.

The tests run as root here, so "someone else" is made by handing a folder to another user id with
:func:`os.chown` (root may), or by pretending to be another user (``os.getuid`` patched).
"""

from __future__ import annotations

import os
import pickle
import stat
import types
import warnings

import numpy as np
import pytest

from lmevi.runtime import jit as runtime
from lmevi.runtime import trust as cache_trust
from lmevi.runtime import cache as cache_lib
from lmevi.runtime import xla
from lmevi.runtime.trust import UntrustedCacheWarning, is_trusted, private_dir

OTHER_UID = 54321  # no user on this machine; only its difference from ours matters


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def folder_with_mode(path, bits: int):
    private_dir(path)
    os.chmod(path, bits)
    return path


class Planted:
    """A pickle whose loading creates the folder ``marker``: proof that the payload ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path, marker) -> None:
    path.write_bytes(pickle.dumps(Planted(marker)))
    os.chmod(path, 0o600)


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each test starts with no folder warned about yet."""
    monkeypatch.setattr(cache_trust, "_warned", set())


# ---------------------------------------------------------------------------------------------------- folders


def test_private_dir_creates_the_folder_and_its_parents_for_the_user_alone(tmp_path):
    folder = private_dir(tmp_path / "a" / "b" / "c")
    assert folder == tmp_path / "a" / "b" / "c" and folder.is_dir()
    for made in (tmp_path / "a", tmp_path / "a" / "b", folder):
        assert mode(made) == 0o700, made
    assert is_trusted(folder)[0]


def test_private_dir_leaves_an_existing_folder_as_it_is_and_refuses_a_file(tmp_path):
    existing = folder_with_mode(tmp_path / "shared", 0o755)
    assert private_dir(existing) == existing and mode(existing) == 0o755
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        private_dir(tmp_path / "file")


def test_a_folder_of_the_user_that_only_the_user_can_write_is_trusted(tmp_path):
    for bits in (0o700, 0o755):
        trusted, reason = is_trusted(folder_with_mode(tmp_path / f"f{bits:o}", bits))
        assert trusted, reason


@pytest.mark.parametrize(("bits", "who"), [(0o770, "its group"), (0o775, "its group"), (0o703, "anyone"),
                                           (0o1777, "anyone")])
def test_a_folder_others_can_write_is_not_trusted(tmp_path, bits, who):
    folder = folder_with_mode(tmp_path / "cache", bits)
    trusted, reason = is_trusted(folder)
    assert not trusted and who in reason and str(folder) in reason


def test_a_folder_of_another_user_is_not_trusted(tmp_path, monkeypatch):
    folder = private_dir(tmp_path / "cache")
    os.chown(folder, OTHER_UID, -1)
    trusted, reason = is_trusted(folder)
    assert not trusted and f"user id {OTHER_UID}" in reason
    # the same from the other side: the folder is ours, the process pretends to be someone else
    os.chown(folder, os.getuid(), -1)
    assert is_trusted(folder)[0]
    monkeypatch.setattr(os, "getuid", lambda: OTHER_UID)
    assert not is_trusted(folder)[0]


def test_without_user_ids_everything_is_trusted_as_before(tmp_path, monkeypatch):
    folder = folder_with_mode(tmp_path / "cache", 0o777)
    monkeypatch.delattr(os, "getuid")
    assert is_trusted(folder) == (True, "this platform has no user ids to check")


# ---------------------------------------------------------------------------------------------------- files


def test_a_file_needs_its_own_and_its_folder_s_trust(tmp_path):
    good = private_dir(tmp_path / "good")
    (good / "x.bin").write_bytes(b"")
    os.chmod(good / "x.bin", 0o600)
    assert is_trusted(good / "x.bin")[0]
    os.chmod(good / "x.bin", 0o666)  # world-writable file in a trusted folder
    trusted, reason = is_trusted(good / "x.bin")
    assert not trusted and "anyone" in reason and "x.bin" in reason
    bad = folder_with_mode(tmp_path / "bad", 0o775)
    (bad / "x.bin").write_bytes(b"")
    os.chmod(bad / "x.bin", 0o600)  # a fine file in a folder the group can write to
    trusted, reason = is_trusted(bad / "x.bin")
    assert not trusted and "its group" in reason and str(bad) in reason
    assert not is_trusted(good / "missing.bin")[0]


def test_a_link_is_judged_by_its_target(tmp_path):
    good, bad = private_dir(tmp_path / "good"), folder_with_mode(tmp_path / "bad", 0o777)
    for folder in (good, bad):
        (folder / "x.bin").write_bytes(b"")
        os.chmod(folder / "x.bin", 0o600)
    (good / "to_good.bin").symlink_to(good / "x.bin")
    (good / "to_bad.bin").symlink_to(bad / "x.bin")
    assert is_trusted(good / "to_good.bin")[0]
    trusted, reason = is_trusted(good / "to_bad.bin")
    assert not trusted and "link" in reason and str(bad) in reason
    (tmp_path / "to_bad_folder").symlink_to(bad)
    assert not is_trusted(tmp_path / "to_bad_folder")[0]
    (tmp_path / "to_good_folder").symlink_to(good)
    assert is_trusted(tmp_path / "to_good_folder")[0]
    # a trusted link into a folder whose file is fine but whose own folder is not: still refused
    (bad / "y.bin").write_bytes(b"")
    os.chmod(bad / "y.bin", 0o600)
    (good / "via.bin").symlink_to(bad / "y.bin")
    assert not is_trusted(good / "via.bin")[0]


# ---------------------------------------------------------------------------------------------------- warning


def test_the_warning_names_the_folder_and_comes_once_per_folder(tmp_path, fresh_warnings):
    one = folder_with_mode(tmp_path / "one", 0o777)
    two = folder_with_mode(tmp_path / "two", 0o770)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [cache_trust.check(one), cache_trust.check(one), cache_trust.check(two)] == [False] * 3
        assert cache_trust.check(private_dir(tmp_path / "mine"))
        (one / "x.bin").write_bytes(b"")
        assert not cache_trust.check(one / "x.bin")  # a file: warned under its folder, already warned
    assert [w.category for w in caught] == [UntrustedCacheWarning] * 2
    assert str(one) in str(caught[0].message) and "not use" in str(caught[0].message)
    assert str(two) in str(caught[1].message) and "its group" in str(caught[1].message)


# ---------------------------------------------------------------------------------------------------- runtime


def test_runtime_never_unpickles_a_file_planted_in_an_untrusted_folder(tmp_path, fresh_warnings):
    """The control half (a trusted folder) shows the payload does run when loaded, so the test can fail."""
    treedef = None  # never reached: the payload fails (or is refused) before the structure is compared
    bad = folder_with_mode(tmp_path / "bad", 0o775)
    plant(bad / "abc.bin", tmp_path / "ran_bad")
    with pytest.warns(UntrustedCacheWarning, match="its group"):
        assert runtime._load(bad, "abc", treedef) is None
    assert not (tmp_path / "ran_bad").exists()
    assert (bad / "abc.bin").exists()  # not ours to delete

    good = private_dir(tmp_path / "good")
    plant(good / "abc.bin", tmp_path / "ran_good")
    assert runtime._load(good, "abc", treedef) is None  # loaded, ran, then failed as an executable
    assert (tmp_path / "ran_good").exists()


def test_runtime_refuses_a_world_writable_file_and_a_key_pointing_out_of_the_folder(tmp_path, fresh_warnings):
    good = private_dir(tmp_path / "good")
    plant(good / "abc.bin", tmp_path / "ran")
    os.chmod(good / "abc.bin", 0o666)
    with pytest.warns(UntrustedCacheWarning, match="anyone"):
        assert runtime._load(good, "abc", None) is None
    bad = folder_with_mode(tmp_path / "bad", 0o777)
    plant(bad / "evil.bin", tmp_path / "ran")
    (good / "k.key").write_text("../bad/evil")  # a call key's link leading outside the cache folder
    with pytest.warns(UntrustedCacheWarning, match="bad can be written by anyone"):
        assert runtime._load(good, "k", None) is None
    assert not (tmp_path / "ran").exists()


def _scaled(x, factor):
    return factor * x


def test_a_fit_with_an_untrusted_cache_folder_runs_compiled_anew(tmp_path, monkeypatch, fresh_warnings):
    """End to end through :func:`runtime.sized_jit`: the planted file sits under the call's own key."""
    monkeypatch.setattr(runtime, "_memory", {})
    cache = folder_with_mode(tmp_path / "cache", 0o777)
    monkeypatch.setattr(cache_lib, "_cache_choice", [cache])
    executables = folder_with_mode(cache / runtime.EXECUTABLES, 0o777)
    name = "tests.test_cache_trust._scaled"
    static = runtime._StaticArgs.of(_scaled, {"static_argnums": 1})
    x = np.arange(4.0)
    digest, _ = runtime._key(f"{name}[full]", *runtime._split(static, (x, 2.0), {}))  # sized_jit's key
    plant(executables / f"{digest}.bin", tmp_path / "ran")
    f = runtime.sized_jit(_scaled, sized=False, static_argnums=1, name=name)
    with pytest.warns(UntrustedCacheWarning, match=str(executables)):
        np.testing.assert_array_equal(f(x, 2.0), 2.0 * x)  # exact: one multiplication by 2
    assert not (tmp_path / "ran").exists()
    assert sorted(p.name for p in executables.iterdir()) == [f"{digest}.bin"]  # nothing written there

    os.chmod(executables, 0o700)  # control: now trusted, the planted file is read and its payload runs
    os.chmod(cache, 0o700)
    runtime._memory.clear()
    np.testing.assert_array_equal(f(x, 2.0), 2.0 * x)
    assert (tmp_path / "ran").exists()


def test_jax_s_cache_is_not_pointed_at_an_untrusted_folder(tmp_path, monkeypatch, fresh_warnings):
    import jax

    updates = []  # JAX's configuration as this process's JAX would be changed, without changing it
    config = types.SimpleNamespace(jax_compilation_cache_dir=None,
                                   update=lambda name, value: updates.append(name))
    monkeypatch.setattr(jax, "config", config)
    cache = private_dir(tmp_path / "cache")
    monkeypatch.setattr(cache_lib, "_cache_choice", [cache])
    folder_with_mode(cache / f"jax-cache-{jax.__version__}", 0o777)
    with pytest.warns(UntrustedCacheWarning, match="jax-cache"):
        assert xla._compilation_cache() is False
    assert updates == []
    os.chmod(cache / f"jax-cache-{jax.__version__}", 0o700)  # control: trusted, JAX is pointed at it
    assert xla._compilation_cache() is True
    assert "jax_compilation_cache_dir" in updates


def test_runtime_creates_its_folders_for_the_user_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_memory", {})
    monkeypatch.setattr(cache_lib, "_cache_choice", [tmp_path / "new" / "lmevi"])
    f = runtime.sized_jit(_scaled, sized=False, static_argnums=1, name="tests.test_cache_trust._scaled.new")
    np.testing.assert_array_equal(f(np.arange(3.0), 3.0), 3.0 * np.arange(3.0))  # exact: one multiplication
    folder = tmp_path / "new" / "lmevi" / runtime.EXECUTABLES
    assert [mode(p) for p in (tmp_path / "new", folder.parent, folder)] == [0o700] * 3
    assert [mode(p) for p in folder.glob("*.bin")] == [0o600]
