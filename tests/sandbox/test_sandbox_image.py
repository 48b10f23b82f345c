"""The image's build context: what each flavour installs."""

from __future__ import annotations

import tomllib

from sandbox.image import REPO_ROOT, TORCH_SPECS, _context


def test_gpu_context_adds_the_gpu_extra_to_the_trainer_requirements(tmp_path):
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = {"cpu": extras["trainer"], "gpu": extras["trainer"] + extras["gpu"]}
    for flavor, requirements in wanted.items():
        ctx = tmp_path / flavor
        ctx.mkdir()
        _context(REPO_ROOT, ctx, flavor, None, TORCH_SPECS[flavor])
        assert (ctx / "requirements.txt").read_text().split() == requirements
        assert (ctx / "Dockerfile.gpu").is_file() and (ctx / "trainer" / "run.py").is_file()
    assert any(r.startswith("nvidia-cudnn-frontend==") for r in extras["gpu"])
