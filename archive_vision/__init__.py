"""archive-vision: classify and orient scanned archives (Beam ingest/score, tf.distribute trainer, TF Serving)."""
__version__ = "0.1.0"
