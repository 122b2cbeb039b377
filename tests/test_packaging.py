"""What a site installs: setup.cfg keeps PyTorch out of the site's requirements, in the [torch] extra."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def requirements(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_pytorch_is_an_extra_not_a_requirement_of_the_site():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    site = requirements(cfg["options"]["install_requires"])
    assert not [r for r in site if r.startswith(("torch", "onnxscript"))]
    assert {"onnx>=1.16", "onnxruntime>=1.18", "numpy>=1.26"} <= set(site)  # the site's builder and runtime
    extra = requirements(cfg["options.extras_require"]["torch"])
    assert "torch==2.13.0" in extra  # the one pin, exactly


def test_the_dev_venv_and_the_hub_take_the_torch_extra():
    make = (ROOT / "Makefile").read_text()
    assert "-e '.[torch]'" in make and "-e '.[torch,test]'" in make
    assert '"$SOURCE[torch]"' in (ROOT / "systemd" / "install-coordinator.sh").read_text()
