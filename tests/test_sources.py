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


def _refuse_to_list(monkeypatch, folder):
    """Make os.scandir fail on `folder` the way an unreadable folder does (chmod cannot, for root)."""
    real_scandir = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and os.path.abspath(os.fspath(path)) == os.path.abspath(str(folder)):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_folder_that_cannot_be_listed_is_an_error_entry_not_a_silent_gap(tmp_path, monkeypatch):
    touch(str(tmp_path / "photo" / "a.jpg"))
    touch(str(tmp_path / "photo" / "locked" / "b.jpg"))
    touch(str(tmp_path / "photo" / "locked" / "c.jpg"))
    _refuse_to_list(monkeypatch, tmp_path / "photo" / "locked")
    entries = list(sources.list_archive(str(tmp_path)))
    good = [os.path.basename(e.uri) for e in entries if not e.error]
    bad = [e for e in entries if e.error]
    assert good == ["a.jpg"]
    assert [(e.uri, e.error_type) for e in bad] == [(str(tmp_path / "photo" / "locked"), "unreadable_dir")]
    assert "Permission denied" in bad[0].error and "not in this run" in bad[0].error


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads a chmod 000 folder anyway; the monkeypatched test covers it")
def test_a_chmod_000_folder_is_an_error_entry(tmp_path):
    touch(str(tmp_path / "a.jpg"))
    touch(str(tmp_path / "locked" / "b.jpg"))
    os.chmod(tmp_path / "locked", 0)
    try:
        entries = list(sources.list_archive(str(tmp_path)))
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert [(os.path.basename(e.uri), bool(e.error)) for e in entries] == [("a.jpg", False), ("locked", True)]
    assert entries[1].error_type == "unreadable_dir"


def test_symlinked_folders_are_followed_once_and_loops_end(tmp_path):
    touch(str(tmp_path / "outside" / "photos" / "p.jpg"))
    touch(str(tmp_path / "archive" / "document" / "d.jpg"))
    os.symlink(str(tmp_path / "outside" / "photos"), str(tmp_path / "archive" / "photo"))  # assembled from a link
    os.symlink(str(tmp_path / "archive"), str(tmp_path / "archive" / "document" / "loop"))  # a cycle
    entries = list(sources.list_archive(str(tmp_path / "archive")))
    assert [(os.path.relpath(e.uri, tmp_path / "archive"), e.label, e.error) for e in entries] == \
        [("document/d.jpg", "document", ""), ("photo/p.jpg", "photo", "")]


def test_local_listings_carry_size_and_mtime_without_reading(tmp_path):
    touch(str(tmp_path / "d" / "a.jpg"), b"abc")
    touch(str(tmp_path / "d" / "b.jpg"), b"abcd")
    path = str(tmp_path / "d" / "a.jpg")
    os.utime(path, ns=(1_000_000_000, 1_234_567_891_011))
    (tmp_path / "m.csv").write_text(f"uri\n{path}\nd/b.jpg\nd/gone.jpg\n")
    folder = {os.path.basename(e.uri): e for e in sources.list_archive(str(tmp_path / "d"))}
    globbed = {os.path.basename(e.uri): e for e in sources.list_archive(str(tmp_path / "d" / "*.jpg"))}
    manifest = {os.path.basename(e.uri): e for e in sources.list_archive(str(tmp_path / "m.csv"))}
    single = list(sources.list_archive(path))
    for listing in (folder, globbed, manifest, {"a.jpg": single[0]}):
        assert (listing["a.jpg"].size_bytes, listing["a.jpg"].fingerprint) == (3, "local:3:1234567891011")
    assert folder["b.jpg"].fingerprint == globbed["b.jpg"].fingerprint == manifest["b.jpg"].fingerprint
    assert folder["b.jpg"].fingerprint.startswith("local:4:")
    assert (manifest["gone.jpg"].size_bytes, manifest["gone.jpg"].fingerprint) == (-1, "")  # read (and fail) later


def test_a_gcs_fingerprint_is_the_content_md5_else_the_generation_and_crc32c():
    from types import SimpleNamespace as Blob

    assert sources.gcs_fingerprint(Blob(size=3, md5_hash="bWQ1", generation=7, crc32c="Y3Jj")) == "gs:3:md5:bWQ1"
    composite = Blob(size=3, md5_hash=None, generation=7, crc32c="Y3Jj")  # composed objects have no MD5
    assert sources.gcs_fingerprint(composite) == "gs:3:7:Y3Jj"
    assert sources.gcs_fingerprint(Blob(size=3, md5_hash=None, generation=None, crc32c=None)) == ""
