"""Listing archives: folder layouts (Keras flow_from_directory), globs, manifests, label modes."""
import os

import pytest

from pipelines import sources


def touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_split_and_label_folders(tmp_path):
    touch(str(tmp_path / "train" / "maps" / "a.jpg"))
    touch(str(tmp_path / "validation" / "letters" / "b.png"))
    touch(str(tmp_path / "test" / "maps" / "deep" / "c.tif"))
    entries = {os.path.basename(e.uri): e for e in sources.list_archive(str(tmp_path))}
    assert (entries["a.jpg"].split, entries["a.jpg"].label) == ("train", "maps")
    assert (entries["b.png"].split, entries["b.png"].label) == ("val", "letters")
    assert (entries["c.tif"].split, entries["c.tif"].label) == ("test", "maps")


def test_loose_files_mean_an_unlabelled_archive(tmp_path):
    touch(str(tmp_path / "1950" / "a.jpg"))
    touch(str(tmp_path / "b.jpg"))
    assert sources.resolve_label_mode(str(tmp_path), "auto") == "none"
    assert all(e.label == "" for e in sources.list_archive(str(tmp_path)))
    labelled = {os.path.basename(e.uri): e.label for e in sources.list_archive(str(tmp_path), "folders")}
    assert labelled == {"a.jpg": "1950", "b.jpg": ""}


def test_broken_symlinks_and_excludes_are_listed_or_skipped_on_purpose(tmp_path):
    touch(str(tmp_path / "a.jpg"))
    touch(str(tmp_path / "Thumbs.db"))
    os.symlink(str(tmp_path / "gone.jpg"), str(tmp_path / "link.jpg"))
    names = sorted(os.path.basename(e.uri) for e in sources.list_archive(str(tmp_path), exclude=["*.db"]))
    assert names == ["a.jpg", "link.jpg"]  # the broken link is an input: it must end as an error row


def test_glob_input(tmp_path):
    touch(str(tmp_path / "x" / "a.jpg"))
    touch(str(tmp_path / "x" / "b.png"))
    names = sorted(os.path.basename(e.uri) for e in sources.list_archive(str(tmp_path / "x" / "*.jpg")))
    assert names == ["a.jpg"]


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        list(sources.list_archive(str(tmp_path / "nope")))


def test_manifest_without_uri_column_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.jpg,x\n")
    with pytest.raises(ValueError, match="no 'uri' column"):
        list(sources.list_archive(str(tmp_path / "m.csv")))


def test_manifest_labels_stay_strings(tmp_path):
    (tmp_path / "m.csv").write_text("uri,label\na.jpg,01\nb.jpg,2\n")
    assert [e.label for e in sources.list_archive(str(tmp_path / "m.csv"))] == ["01", "2"]
