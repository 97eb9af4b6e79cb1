"""eval.py: metrics against hand-computed examples, and clear errors for bad checkpoints."""
import numpy as np
import pytest
import torch

import eval as ev


def test_rankdata_ties():
    assert ev.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_hand_computed():
    assert ev.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ev.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x = 1 2 3 4 5, ranks y = 2 1 4 3 5: d^2 sum = 4, rho = 1 - 6*4/(5*24) = 0.8
    assert ev.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # monotone non-linear transforms do not change it
    x = np.random.default_rng(0).normal(size=20)
    assert ev.spearman(x, np.exp(3 * x)) == pytest.approx(1.0)


def test_auroc_hand_computed():
    assert ev.auroc([3, 4], [1, 2]) == 1.0
    assert ev.auroc([1, 2], [3, 4]) == 0.0
    # pairs (pos, neg): (2,1) win, (2,3) loss, (4,1) win, (4,3) win -> 3/4
    assert ev.auroc([2, 4], [1, 3]) == 0.75
    assert ev.auroc([1], [1]) == 0.5  # a tie counts one half


def test_bad_checkpoint_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        ev.load_checkpoint(str(tmp_path / "missing.pt"), "videogpt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a readable"):
        ev.load_checkpoint(str(junk), "videogpt")
    wrong = tmp_path / "vqgan.pt"
    torch.save({"kind": "vqgan"}, wrong)
    with pytest.raises(SystemExit, match="is a vqgan checkpoint, expected a videogpt"):
        ev.load_checkpoint(str(wrong), "videogpt")
