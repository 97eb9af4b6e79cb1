"""Code shared between stage scripts is copied on purpose (each script stands alone).
This test keeps every copy byte-identical to its source, and each script's copies to what it runs."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# block name -> (source file, files holding a verbatim copy)
BLOCKS = {
    "ENV": ("collect_expert_videos.py", ["train_viper_dreamer.py"]),
    # frames -> codes (the agent scores frames); the decoder half (codes -> frames) trains and decodes samples
    "VQGAN_ENCODER": ("train_vqgan.py", ["train_videogpt.py", "train_viper_dreamer.py"]),
    "VQGAN_DECODER": ("train_vqgan.py", ["train_videogpt.py"]),
    # the transformer and the VIPER reward; sampling (KV cache) stays in train_videogpt.py
    "VIDEOGPT": ("train_videogpt.py", ["train_viper_dreamer.py"]),
    "FILES": ("train_vqgan.py", ["train_videogpt.py"]),  # reading episode files, writing checkpoints, SIGTERM
}


def extract(filename, name):
    text = open(os.path.join(ROOT, filename)).read()
    m = re.search(rf"^# ==== {name}:.*?^# ==== END {name} ====$", text, re.S | re.M)
    assert m, f"{filename} has no '# ==== {name}: ...' / '# ==== END {name} ====' block"
    return m.group(0)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_copies_are_identical(name):
    source, copies = BLOCKS[name]
    reference = extract(source, name)
    assert len(reference.splitlines()) > 20
    marker = (f"# ==== {name}: copied verbatim from {source} into {', '.join(copies)}; "
              f"tests/test_parity.py keeps the copies identical ====")
    assert reference.splitlines()[0] == marker, f"{source}'s {name} marker line should read: {marker}"
    for copy in copies:
        assert extract(copy, name) == reference, f"{copy}'s {name} block differs from {source}; re-copy it"


def test_the_agent_copies_only_what_it_runs():
    """train_viper_dreamer.py scores frames: its copies hold no decoder, no sampling and no KV cache."""
    agent = "train_viper_dreamer.py"
    copied = "".join(extract(agent, name) for name, (_, copies) in BLOCKS.items() if agent in copies)
    found = re.findall(r"class Decoder\b|self\.decoder\b|def decode\b|def sample\w*|\bKVCache\b|\bcache\b", copied)
    assert not found, f"{agent}'s copied blocks hold {sorted(set(found))}"
