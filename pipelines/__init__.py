"""archive-vision's Beam jobs (ingest, score, review) and what they share."""
import os as _os


def gcs_emulator_connects_anonymously() -> None:
    """With STORAGE_EMULATOR_HOST set (a local GCS emulator: the tests, a trial on one machine), Beam's GCS IO
    connects anonymously at once. Otherwise every process looks for Application Default Credentials first, which
    an emulator does not need and a machine off GCP does not have: Beam retries that search with backoff for about
    20 s per process before it connects anonymously anyway. Real buckets (no emulator) are untouched."""
    if not _os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    try:
        from apache_beam.internal.gcp import auth
    except ImportError:  # Beam without its GCP extra: no GCS IO to configure
        return
    cached = getattr(auth, "_Credentials", None)
    if cached is not None and hasattr(cached, "_credentials_init"):
        with cached._credentials_lock:  # noqa: SLF001 - Beam's per-process cache of the credentials it found
            if not cached._credentials_init:  # noqa: SLF001
                cached._credentials, cached._credentials_init = None, True  # noqa: SLF001 - None: anonymous


gcs_emulator_connects_anonymously()
