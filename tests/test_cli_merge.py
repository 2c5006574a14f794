"""`merge` on the command line: a merge that can change nothing is refused before anything is written."""
from __future__ import annotations

import pytest

from lora_trainer.cli import main


@pytest.mark.parametrize("weights, refused", [(["0", "0"], True), (["-0.0", "0"], True), (["0", "0.5"], False)])
def test_both_weights_zero_is_refused_before_anything_is_written(created_sd1, capsys, weights, refused):
    root = created_sd1.working.parent
    before = sorted(p for p in root.rglob("*"))
    code = main(["merge", "--models-dir", str(root), "--model", "tiny", "--unet-weight", weights[0],
                 "--text-weight", weights[1]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    # The shared tiny model has no LoRA: a merge that may change something goes on and is refused for that.
    said = "'unet_weight') and Lora Text Weight ('text_weight') are both 0" in err[0] and "change nothing" in err[0]
    assert said == refused, err
    assert sorted(p for p in root.rglob("*")) == before
