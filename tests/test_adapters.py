"""The adapter-directory protocol: publish, list, read back, refuse what is not (or not this) version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persd_online import adapters
from persd_online.adapters import AdapterNotReadyError


def save(staging: Path) -> None:
    (staging / "adapter_model.safetensors").write_bytes(b"weights")


def test_published_versions_are_listed_and_the_newest_is_latest(tmp_path) -> None:
    root = tmp_path / "adapters"
    assert adapters.published_versions(root) == [] and adapters.latest(root) == 0
    for version in (1, 3, 2):
        path = adapters.publish_version(root, version, save, {"step": version})
        assert path == adapters.version_dir(root, version) and adapters.is_published(path)
    assert adapters.published_versions(root) == [1, 2, 3] and adapters.latest(root) == 3
    assert adapters.read_metadata(adapters.version_dir(root, 3)) == {"version": 3, "step": 3}
    adapters.check_published(3, adapters.version_dir(root, 3))


def test_the_on_disk_names_stay_what_readers_of_old_runs_expect(tmp_path) -> None:
    adapters.publish_version(tmp_path, 3, save, {"version": 3})
    assert sorted(p.name for p in (tmp_path / "v0003").iterdir()) == ["COMPLETE", "adapter_model.safetensors",
                                                                     "adapter_version.json"]
    assert json.loads((tmp_path / "v0003" / "adapter_version.json").read_text()) == {"version": 3}


def test_a_directory_without_the_marker_is_not_listed_nor_loadable(tmp_path) -> None:
    adapters.publish_version(tmp_path, 1, save, {})
    unfinished = adapters.version_dir(tmp_path, 2)
    unfinished.mkdir()
    (unfinished / adapters.VERSION_FILE).write_text(json.dumps({"version": 2}))
    (tmp_path / ".v0003.tmp-x").mkdir()  # a staging directory
    assert adapters.published_versions(tmp_path) == [1] and adapters.latest(tmp_path) == 1
    with pytest.raises(AdapterNotReadyError, match="no COMPLETE marker"):
        adapters.check_published(2, unfinished)


def test_metadata_naming_another_version_is_refused(tmp_path) -> None:
    path = adapters.publish_version(tmp_path, 1, save, {})
    with pytest.raises(ValueError, match="says version 1, but it was loaded as version 2"):
        adapters.check_published(2, path)
    with pytest.raises(ValueError, match="names version 5"):
        adapters.publish_version(tmp_path, 2, save, {"version": 5})
    assert adapters.published_versions(tmp_path) == [1]


def test_a_directory_without_metadata_is_served_as_any_version(tmp_path) -> None:
    zero = adapters.publish(tmp_path / "zero-adapter", save)
    assert adapters.read_metadata(zero) is None
    adapters.check_published(0, zero)


def test_a_published_version_is_never_overwritten_and_a_failed_one_leaves_nothing(tmp_path) -> None:
    adapters.publish_version(tmp_path, 1, save, {"step": 1})
    with pytest.raises(FileExistsError):
        adapters.publish_version(tmp_path, 1, save, {"step": 2})
    assert adapters.read_metadata(adapters.version_dir(tmp_path, 1)) == {"version": 1, "step": 1}

    def crash(staging: Path) -> None:
        save(staging)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        adapters.publish_version(tmp_path, 2, crash, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v0001"]
