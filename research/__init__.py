"""The default orientation model's research lab: the corpus, its cached features, the training recipe and the
accuracy study behind the shipped head (trainer/data/default_orientation_head.npz). Not part of the installed
package (setup.py leaves it out, and nothing installed imports it); run from the repository root:

    python -m research.train_default --corpus corpus-data --cache corpus-features   # make default-model
    python -m research.quality --corpus corpus-data --figures docs/quality          # make bench-quality

No import circles: orientation_corpus and orientation_features import nothing here; recipe (the head-training
recipe the experiments share) imports those two; learning_curve and backbone_compare import recipe;
train_default imports all of them; quality imports train_default; orientation_sources imports orientation_corpus.
"""
