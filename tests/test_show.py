"""`tokendrop.show`: the drawn grids are the kept tokens of `handle.last`, for every method."""

import numpy as np
import pytest

import reference
import tokendrop
from tokendrop.adapters import adapter_for
from tokendrop.harness import chat_prompt
from tokendrop.method import METHODS
from tokendrop.presets import synthetic_image
from tokendrop.visualize import DIM, dimmed, kept_grids, show


@pytest.mark.parametrize("method", METHODS.names())
def test_show_writes_a_figure_of_the_kept_tokens(tiny, tmp_path, method):
    model, processor = tiny
    image = synthetic_image(100, 60, seed=3)
    out = tmp_path / f"{method}.png"
    figure = show(model, processor, image, method, budget=0.25, question="Where is red?", out=out)
    assert out.stat().st_size > 10_000
    base_title, canvas_title = (ax.get_title() for ax in figure.axes)
    assert method in figure._suptitle.get_text()
    # the titles count exactly the kept tokens: rerun the same selection through a plain patch
    handle = tokendrop.patch(model, method, budget=0.25, processor=processor)
    inputs = processor(
        images=[image],
        text=[chat_prompt(processor, "Where is red?")],
        return_tensors="pt",
    )
    model.generate(**inputs, max_new_tokens=1)
    record = handle.last[0]
    assert base_title.startswith(f"base view: {record.partitions[0]}/36")
    assert canvas_title.startswith(f"crop canvas: {record.n_kept - record.partitions[0]}/")


def test_kept_grids_match_reference_geometry(tiny):
    model, _ = tiny
    height, width = 60, 100
    layout = adapter_for(model).layout((height, width))
    feats, _ = reference.features(model, height, width)
    side, _, n_w, (y0, y1, x0, x1) = reference.geometry(model, height, width)
    indices = [0, 5, 35, 36, 40, 36 + (x1 - x0) + 3, len(feats) - 1]
    base, canvas = kept_grids(layout, indices)
    assert base.sum() + canvas.sum() == len(indices)
    for i in indices:
        if i < side * side:
            assert base[i // side, i % side]
        else:
            j = i - side * side
            assert canvas[j // (x1 - x0), j % (x1 - x0)]


def test_dimmed_darkens_only_dropped_cells():
    image = synthetic_image(40, 20, seed=1)
    grid = np.array([[True, False], [False, True]])
    pixels = np.asarray(image, dtype=np.float32) / 255
    out = dimmed(image, grid)
    assert np.allclose(out[:10, :20], pixels[:10, :20])
    assert np.allclose(out[:10, 20:], DIM * pixels[:10, 20:])
    assert np.allclose(out[10:, :20], DIM * pixels[10:, :20])


def test_show_command_line(tmp_path, capsys):
    from tokendrop.cli import main

    image = tmp_path / "photo.png"
    synthetic_image(120, 80, seed=2).save(image)
    out = tmp_path / "kept.png"
    assert (
        main(
            [
                "show",
                str(image),
                "--model",
                "tiny",
                "--dtype",
                "fp32",
                "--method",
                "uniform",
                "--budget",
                "0.25",
                "--question",
                "Where is red?",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert out.stat().st_size > 10_000 and f"wrote {out}" in capsys.readouterr().out


def test_show_inside_the_vision_tower(tiny, tmp_path, capsys):
    from tokendrop.cli import main

    image = tmp_path / "photo.png"
    synthetic_image(120, 80, seed=2).save(image)
    out = tmp_path / "kept.png"
    argv = ["show", str(image), "--model", "tiny", "--method", "hired", "--vision-prune-layer", "0", "--out", str(out)]
    assert main(argv) == 0
    assert out.stat().st_size > 10_000
    model, processor = tiny
    figure = show(model, processor, synthetic_image(120, 80), "cls", 0.2, vision_prune_layer=-3)
    assert "cls at vision layer 0, budget 0.2" in figure._suptitle.get_text()
