"""The compiled library is loaded from the cache only when nobody else could have replaced it:
cache directory and file owned by this user, not group/world-writable, and the file's SHA-256
equal to the digest recorded when this version built it; otherwise rebuilt or not used."""

import logging
import os
import shutil

import pytest

from collapselab.fast import native


def _lib(tmp_path):
    d = tmp_path / "native"
    d.mkdir(mode=0o700)
    lib = d / "kernels-x.so"
    lib.write_bytes(b"\x7fELF fake library")
    lib.chmod(0o700)
    (d / "kernels-x.so.sha256").write_text(native._sha256(lib))
    (d / "kernels-x.so.sha256").chmod(0o600)
    return d, lib


def test_a_private_matching_library_is_trusted(tmp_path):
    _, lib = _lib(tmp_path)
    assert native.cached_library_problem(lib) is None


def test_a_changed_library_is_not_loaded(tmp_path):
    _, lib = _lib(tmp_path)
    with open(lib, "ab") as fh:
        fh.write(b"!")
    assert "does not match the digest" in native.cached_library_problem(lib)


@pytest.mark.parametrize("which", ["dir", "file", "digest"])
def test_group_or_world_writable_is_not_trusted(tmp_path, which):
    d, lib = _lib(tmp_path)
    target = {"dir": d, "file": lib, "digest": d / "kernels-x.so.sha256"}[which]
    target.chmod(target.stat().st_mode | 0o020)
    assert "writable by group or others" in native.cached_library_problem(lib)
    target.chmod(target.stat().st_mode & ~0o020 | 0o002)
    assert "writable by group or others" in native.cached_library_problem(lib)


def test_missing_digest_or_symlink_is_not_trusted(tmp_path):
    d, lib = _lib(tmp_path)
    link = d / "kernels-y.so"
    link.symlink_to(lib)
    (d / "kernels-y.so.sha256").write_text(native._sha256(lib))
    (d / "kernels-y.so.sha256").chmod(0o600)
    assert "symbolic link" in native.cached_library_problem(link)
    (d / "kernels-x.so.sha256").unlink()
    assert native.cached_library_problem(lib) is not None


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX ownership")
def test_another_owner_is_not_trusted(tmp_path, monkeypatch):
    _, lib = _lib(tmp_path)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(lib).st_uid + 1)
    assert "owned by uid" in native.cached_library_problem(lib)


@pytest.fixture
def fresh_load(tmp_path, monkeypatch):
    """native.load() against an empty cache under tmp_path (its memo cleared around the test)."""
    monkeypatch.setenv("COLLAPSELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("COLLAPSELAB_NATIVE", raising=False)
    native.load.cache_clear()
    yield tmp_path / "cache" / "native"
    native.load.cache_clear()


def test_load_rebuilds_a_tampered_library_and_refuses_an_open_cache(fresh_load, caplog):
    if native.load() is None:
        if native.status().startswith("off: no C compiler") or "needs Linux" in native.status() \
                or "neither AVX2" in native.status():
            pytest.skip(native.status())
        pytest.fail(native.status())
    (lib,) = fresh_load.glob("kernels-*.so")
    assert native.cached_library_problem(lib) is None
    assert oct(fresh_load.stat().st_mode & 0o777) == "0o700"
    with open(lib, "ab") as fh:  # someone changed the library after it was built
        fh.write(b"\0")
    native.load.cache_clear()
    with caplog.at_level(logging.INFO, logger="collapselab.fast.native"):
        assert native.load() is not None  # rebuilt, then loaded
    assert [r.message for r in caplog.records if "rebuilding" in r.message]
    assert native.cached_library_problem(lib) is None
    caplog.clear()
    fresh_load.chmod(0o777)  # a cache directory others can write to: nothing is loaded from it
    native.load.cache_clear()
    with caplog.at_level(logging.INFO, logger="collapselab.fast.native"):
        assert native.load() is None
    assert "not trusted" in native.status()
    assert len([r for r in caplog.records if "unavailable" in r.message]) == 1
    fresh_load.chmod(0o700)
    shutil.rmtree(fresh_load)
