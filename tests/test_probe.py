"""train/probe.py: per-patch labels, the linear probe, and the command end to end."""
import json

import numpy as np
import pytest

from edgevlm.cli import main
from edgevlm.runtime.errors import EdgeVLMError
from edgevlm.train.data.shapes_questions import COLOURS, KINDS, Scene, Shape
from edgevlm.train.probe import held_out_split, linear_probe, patch_labels
from edgevlm.train.probe_readout import binding_questions, readout_probe


def test_patch_labels_follow_the_drawn_shape():
    square = Shape("square", "blue", cx=84, cy=84, size=84, small=False)  # covers pixels 42..126
    star = Shape("star", "red", cx=250, cy=250, size=100, small=False)
    labels = patch_labels(Scene(side=336, shapes=[square, star]), grid=24).reshape(24, 24)
    blue_square = 1 + COLOURS.index("blue") * len(KINDS) + KINDS.index("square")
    # patch centres 7 + 14 i: rows/cols 3..8 (centres 49..119) lie inside the square
    assert (labels[3:9, 3:9] == blue_square).all()
    assert labels[2, 5] == 0 and labels[9, 5] == 0 and labels[0, 0] == 0
    red_star = 1 + COLOURS.index("red") * len(KINDS) + KINDS.index("star")
    assert labels[17, 17] == red_star  # centre (245, 245) is in the star's body
    assert set(np.unique(labels)) == {0, blue_square, red_star}


def test_linear_probe_separates_what_is_linear_and_not_noise():
    gen = np.random.default_rng(0)
    y = gen.integers(0, 4, size=800)
    informative = np.eye(4)[y] * 3 + gen.normal(size=(800, 4))
    noise = gen.normal(size=(800, 16))
    assert linear_probe(np.hstack([informative, noise]), y, seed=0) > 0.9
    assert linear_probe(noise, y, seed=0) < 0.4  # chance is 0.25


def test_binding_questions_ask_only_about_unique_colours():
    shapes = [Shape("circle", "red", 60, 60, 40, False), Shape("square", "blue", 250, 60, 40, False),
              Shape("star", "blue", 60, 250, 40, False)]
    rows = binding_questions([Scene(side=336, shapes=shapes[1:]), Scene(side=336, shapes=shapes)])
    assert rows.tolist() == [[1, COLOURS.index("red"), KINDS.index("circle")]]


def _binding_tokens(n_scenes: int, with_kind: bool):
    """Scenes of 8 tokens; 3 of them are objects (colour one-hot, kind one-hot if ``with_kind``)."""
    gen = np.random.default_rng(0)
    tokens = gen.normal(scale=0.3, size=(n_scenes, 8, 12))
    rows = []
    for i in range(n_scenes):
        for slot, colour, kind in zip(gen.permutation(8)[:3], gen.permutation(6)[:3], gen.integers(0, 4, 3)):
            tokens[i, slot, colour] += 2
            tokens[i, slot, 6 + kind] += 2 * with_kind
            tokens[i, slot, 11] += 2  # "something is here"
            rows.append((i, colour, kind))
    return tokens.astype(np.float32), np.asarray(rows)


def test_readout_binds_colour_to_kind_only_when_the_tokens_carry_it():
    tokens, rows = _binding_tokens(300, with_kind=True)
    learned = readout_probe(tokens, rows, n_queries=6, n_classes=4, epochs=6, seed=0)
    assert learned["n_test_questions"] == 225 and len(learned["accuracy_per_epoch"]) == 6
    assert learned["accuracy"] > 0.9
    tokens, rows = _binding_tokens(300, with_kind=False)
    blind = readout_probe(tokens, rows, n_queries=6, n_classes=4, epochs=6, seed=0)
    assert blind["accuracy"] < 0.45 and blind["majority"] < 0.45  # 4 balanced kinds
    with pytest.raises(EdgeVLMError, match="too few scenes"):  # every question on one scene
        readout_probe(tokens[:4], rows[rows[:, 0] == 0], n_queries=6, n_classes=4, epochs=1, seed=0)


def test_held_out_split_is_a_seeded_partition():
    train, test = held_out_split(40, seed=3)
    assert len(train) == 30 and len(test) == 10
    assert sorted([*train, *test]) == list(range(40))
    assert (held_out_split(40, seed=3)[1] == test).all() and not (held_out_split(40, seed=4)[1] == test).all()


def test_probe_command(tmp_path, capsys):
    out = tmp_path / "probe.json"
    rc = main(["probe", "--model", "tiny", "--images", "16", "--supervised-steps", "2", "--threads", "1",
               "--set", "vision__num_hidden_layers=3", "--readout-epochs", "2", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["overrides"] == {"vision__num_hidden_layers": 3}
    assert result["vision_layers_used"] == 2  # hidden_states[-2] of 3 blocks (the preset has 4)
    sup, pr = result["supervised"], result["probe"]
    assert sup["steps"] == 2
    assert pr["n_shapes"] >= 16
    for key in ("kind_vision", "kind_integrator", "colour_vision", "colour_integrator", "kind_majority",
                "patch_kind_accuracy"):
        value = pr.get(key, sup.get(key))
        assert 0.0 <= value <= 1.0, key
    readout = result["readout"]
    assert len(readout["accuracy_per_epoch"]) == 2 and readout["n_test_questions"] > 0
    assert 0.0 <= readout["accuracy"] <= 1.0 and 0.0 < readout["majority"] <= 1.0


def test_probe_rejects_bad_arguments(capsys):
    assert main(["probe", "--model", "tiny", "--images", "2"]) == 2
    assert "--images must be at least 8" in capsys.readouterr().err
    assert main(["probe", "--model", "tiny", "--readout-epochs", "-1"]) == 2
    assert "--readout-epochs and --supervised-steps must be >= 0" in capsys.readouterr().err
    assert main(["probe", "--model", "tiny", "--set", "vision__num_hidden_layers"]) == 2
    assert "--set 'vision__num_hidden_layers' is not of the form key=value" in capsys.readouterr().err
