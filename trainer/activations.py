"""What the frozen backbone sees (`archive-vision activations`): feature maps of a few layers and a mean-activation
overlay, as one self-contained HTML page."""
from __future__ import annotations

import argparse
import html
import sys
import json
import os
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from pipelines.cli import command_parser
from pipelines.pictures import _CSS, _jpeg_data_uri, _png_data_uri, colour_map

def _backbone_from(path: str, backbone: str, image_size: int):
    """A Keras model to look into: a .keras file / job dir, else the backbone named in an export's
    training_config.json (the trainer freezes it, so its feature maps are the trained model's), else `backbone`."""
    import keras

    from trainer import backbones

    if path and (path.endswith(".keras") or (os.path.isdir(path) and any(
            f.endswith(".keras") for _, _, files in os.walk(path) for f in files))):
        from serving.export import load_keras_model

        model, _ = load_keras_model(path)
        return model, int(model.inputs[0].shape[1])
    weights = "imagenet"
    if path:
        from serving.export import resolve_version_dir

        config_path = os.path.join(resolve_version_dir(path), "assets.extra", "training_config.json")
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            config = config.get("config", config)
            backbone = config.get("backbone", backbone)
            weights = config.get("weights", weights)
            image_size = int(config.get("image_size", image_size))
    model = backbones.build_backbone(backbone, weights=weights, image_size=image_size)
    assert isinstance(model, keras.Model)
    return model, image_size


def feature_map_layers(model) -> List[Tuple[Tuple[str, ...], Any]]:
    """(path of nested model names, layer) for every layer with a 4-D output, nested models flattened."""
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(((layer.name,) + path, inner) for path, inner in feature_map_layers(layer))
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and not isinstance(layer, keras.layers.InputLayer):
            out.append(((), layer))
    return out


def _tap(model, path: Tuple[str, ...], layer_name: str):
    """pixels -> that layer's output, for a layer inside nested models (each level cut at its input)."""
    import keras

    if not path:
        return keras.Model(model.inputs, model.get_layer(layer_name).output)
    inner = model.get_layer(path[0])
    # The tensor that feeds the nested model in this graph: everything before it, as a model of its own.
    feeding = inner._inbound_nodes[0].input_tensors
    before = keras.Model(model.inputs, feeding[0] if len(feeding) == 1 else feeding)
    inside = _tap(inner, path[1:], layer_name)
    return lambda pixels: inside(before(pixels))


def choose_layers(model, names: Sequence[str], count: int = 4) -> List[Tuple[Tuple[str, ...], Any]]:
    """The named layers, or `count` convolution outputs spread evenly from the first to the last."""
    import keras

    found = feature_map_layers(model)
    if names:
        by_name = {layer.name: (path, layer) for path, layer in found}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"no 4-D layer named {missing}; some are: {[l.name for _, l in found][:40]}")
        return [by_name[n] for n in names]
    convs = [(p, l) for p, l in found if isinstance(l, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))] \
        or found
    if len(convs) <= count:
        return convs
    picks = np.linspace(0, len(convs) - 1, count).round().astype(int)
    return [convs[i] for i in sorted(set(picks))]


def feature_grid(maps: np.ndarray, tiles: int = 16, tile: int = 64) -> Image.Image:
    """[h, w, C] activations -> a grid of the `tiles` most active channels, each scaled to its own range."""
    order = np.argsort(-maps.mean(axis=(0, 1)))[:tiles]
    cols = int(np.ceil(np.sqrt(len(order))))
    rows = int(np.ceil(len(order) / cols))
    grid = Image.new("RGB", (cols * (tile + 2), rows * (tile + 2)), "white")
    for k, channel in enumerate(order):
        m = maps[..., channel]
        m = (m - m.min()) / (m.max() - m.min() + 1e-9)
        picture = Image.fromarray(colour_map(m)).resize((tile, tile), Image.Resampling.NEAREST)
        grid.paste(picture, ((k % cols) * (tile + 2), (k // cols) * (tile + 2)))
    return grid


def energy_overlay(image: Image.Image, maps: np.ndarray) -> Image.Image:
    """The image with the mean activation of a (late) layer laid over it: where the network responds."""
    energy = np.abs(maps).mean(axis=-1)
    energy = (energy - energy.min()) / (energy.max() - energy.min() + 1e-9)
    heat = Image.fromarray(colour_map(energy)).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image.convert("RGB"), heat, 0.5)


def write_activations(images: Sequence[str], output: str, *, model_path: str = "", backbone: str = "",
                      layers: Sequence[str] = (), image_size: int = 224) -> str:
    """OUTPUT/activations.html (self-contained) + OUTPUT/<image>.activations.png; returns the HTML path."""
    from pipelines import imaging
    from trainer.backbones import DEFAULT_BACKBONE

    import warnings

    warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")  # Keras' list-vs-tensor note
    model, size = _backbone_from(model_path, backbone or DEFAULT_BACKBONE, image_size)
    chosen = choose_layers(model, layers)
    taps = [(layer.name, _tap(model, path, layer.name)) for path, layer in chosen]
    os.makedirs(output, exist_ok=True)
    sections = []
    for path in images:
        with open(path, "rb") as f:
            page = next(imaging.decode_pages(f.read()))
        square = imaging.resize(page.image, size, "pad")
        pixels = np.asarray(square, np.float32)[None]
        figures, panels = [], [square]
        last = None
        for name, tap in taps:
            maps = np.asarray(tap(pixels))[0]
            last = maps
            grid = feature_grid(maps)
            panels.append(grid)
            figures.append(f'<figure class="thumb"><img style="max-width:280px;max-height:280px" '
                           f'src="{_png_data_uri(grid)}" alt="{html.escape(name)}"><figcaption>{html.escape(name)} '
                           f'{maps.shape[0]}x{maps.shape[1]}x{maps.shape[2]} (16 most active channels)'
                           f'</figcaption></figure>')
        overlay = energy_overlay(square, last) if last is not None else square
        figures.insert(0, f'<figure class="thumb"><img src="{_jpeg_data_uri(overlay)}" alt="overlay">'
                          f'<figcaption>mean activation of {html.escape(taps[-1][0])} over the image</figcaption>'
                          f'</figure>')
        strip_height = 280
        strip = Image.new("RGB", (sum(int(p.width * strip_height / p.height) + 8 for p in panels + [overlay]),
                                  strip_height), "white")
        x = 0
        for panel in [square, overlay] + panels[1:]:
            w = int(panel.width * strip_height / panel.height)
            strip.paste(panel.resize((w, strip_height)), (x, 0))
            x += w + 8
        strip.save(os.path.join(output, os.path.basename(path) + ".activations.png"))
        sections.append(f'<h2>{html.escape(os.path.basename(path))}</h2><div class="sheet">{"".join(figures)}</div>')
    page_html = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>archive-vision activations"
                 f"</title><style>{_CSS}</style></head><body><h1>What the backbone sees</h1><p class=meta>"
                 f"{html.escape(model.name)}, layers {', '.join(html.escape(n) for n, _ in taps)}</p>"
                 f"{''.join(sections)}</body></html>")
    out_path = os.path.join(output, "activations.html")
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(page_html)
    return out_path


# ---------------------------------------------------------------- CLI


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = command_parser(
        "archive-vision activations",
        examples=("archive-vision activations scan1.jpg scan2.png --model jobs/run1/export --output act",
                  "archive-vision activations scan1.jpg --backbone mobilenet_v2 --layers block_3_add,block_13_add"),
        description="Write OUTPUT/activations.html: the feature maps of a few backbone layers and a mean-activation "
                    "overlay for some images.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="images to show feature maps for")
    parser.add_argument("--model", default="", help="an export (version dir or base; its training_config.json "
                                                    "names the backbone) or a .keras model")
    parser.add_argument("--backbone", default="", help="without --model: a backbone name")
    parser.add_argument("--layers", default="", help="comma-separated layer names (default: 4 spread out)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--output", default="activations", help="where activations.html goes")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`archive-vision activations`."""
    args = _parse_args(argv)
    path = write_activations(args.images, args.output, model_path=args.model, backbone=args.backbone,
                             layers=[n.strip() for n in args.layers.split(",") if n.strip()],
                             image_size=args.image_size)
    print(f"activations: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
