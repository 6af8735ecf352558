import subprocess
import sys

import pyrovae


def test_all_names_import_and_are_unique():
    assert len(pyrovae.__all__) == len(set(pyrovae.__all__)), pyrovae.__all__
    for name in pyrovae.__all__:
        assert getattr(pyrovae, name) is not None, name


def test_import_is_light():
    code = (
        "import sys, pyrovae, torch; "
        "print('torchvision' in sys.modules, 'arviz' in sys.modules, torch.cuda.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"], out.stdout + out.stderr
