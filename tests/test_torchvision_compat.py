"""The real torchvision, torch-fidelity and clean-fid import next to this torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from attnbench.torchvision_compat import (
    import_cleanfid,
    import_torch_fidelity,
    import_torchvision,
    torchvision_status,
)


def test_real_libraries_import():
    tv = import_torchvision()
    assert tv.__file__ and "site-packages" in tv.__file__  # the installed package, no stand-in
    tf, cf = import_torch_fidelity(), import_cleanfid()
    assert tf.__version__ and hasattr(cf.fid, "frechet_distance")
    # what the FID libraries use from torchvision works
    x = torch.rand(2, 3, 8, 8)
    y = tv.transforms.functional.normalize(x, [0.5] * 3, [0.5] * 3)
    assert torch.allclose(y, (x - 0.5) / 0.5)
    assert tv.models.vgg16 is not None


def test_status_explains_the_workaround():
    status = torchvision_status()
    if status["compiled_ops"]:
        assert status["placeholder_ops"] == []  # a working torchvision is left alone
    else:
        assert "torchvision::nms" in status["placeholder_ops"]
        assert "does not exist" in status["reason"]


def test_compiled_ops_still_fail_loudly():
    """The placeholders carry no kernel: torchvision's own error, not a wrong answer."""
    tv = import_torchvision()
    if tv.extension._has_ops():
        pytest.skip("torchvision's compiled ops load on this machine")
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        tv.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)


def test_fresh_process_import_order():
    """torch-fidelity imported first thing in a new interpreter (no torchvision yet)."""
    code = ("from attnbench.torchvision_compat import import_torch_fidelity as f; "
            "import sys; f(); print('torch_fidelity' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
