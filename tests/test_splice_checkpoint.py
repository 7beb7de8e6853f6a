"""scripts/splice_checkpoint.py: a checkpoint copy with the tensors under some prefixes taken from
another checkpoint; everything else (other tensors, metadata, side files) as the base had it."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _ckpt(path, tensors) -> None:
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text('{"format": "minigem"}\n')
    (path / "trainer_state.pt").write_bytes(b"state")
    (path / "sub").mkdir()
    (path / "sub" / "f.txt").write_text("x")


def _pair(tmp_path, donor_extra=None, donor_shape=(3, 2)):
    g = torch.Generator().manual_seed(0)
    base = {"aux.a": torch.randn(3, 2, generator=g), "aux.b": torch.randn(4, generator=g),
            "llm.w": torch.randn(5, generator=g).to(torch.bfloat16)}
    donor = {"aux.a": torch.randn(*donor_shape, generator=g), "aux.b": torch.randn(4, generator=g),
             "llm.w": torch.randn(5, generator=g).to(torch.bfloat16), **(donor_extra or {})}
    _ckpt(tmp_path / "base", base)
    _ckpt(tmp_path / "donor", donor)
    return base, donor


def test_splice_takes_the_prefixed_tensors_from_the_donor(tmp_path) -> None:
    sc = load_script("splice_checkpoint")
    base, donor = _pair(tmp_path)
    assert sc.main([str(tmp_path / "base"), str(tmp_path / "donor"), str(tmp_path / "out"),
                    "--prefix", "aux."]) == 0
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(base)
    assert torch.equal(out["aux.a"], donor["aux.a"]) and torch.equal(out["aux.b"], donor["aux.b"])
    assert torch.equal(out["llm.w"], base["llm.w"]) and not torch.equal(out["llm.w"], donor["llm.w"])
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert (tmp_path / "out" / "trainer_state.pt").read_bytes() == b"state"
    assert (tmp_path / "out" / "sub" / "f.txt").read_text() == "x"
    # the base is left as it was
    assert torch.equal(load_file(str(tmp_path / "base" / "model.safetensors"))["aux.a"], base["aux.a"])


@pytest.mark.parametrize("case, message", [
    ("shape", r"aux.a: \(3, 2\) in .*base, \(2, 3\) in .*donor"),
    ("extra", r"only in .*donor: aux.c"),
    ("prefix", r"--prefix 'vision.' matches no tensor"),
    ("exists", r"already exists"),
    ("missing", r"no model.safetensors"),
])
def test_splice_errors_name_what_differs(tmp_path, case, message) -> None:
    sc = load_script("splice_checkpoint")
    _pair(tmp_path, donor_extra={"aux.c": torch.zeros(1)} if case == "extra" else None,
          donor_shape=(2, 3) if case == "shape" else (3, 2))
    donor = tmp_path / ("nowhere" if case == "missing" else "donor")
    out = tmp_path / "out"
    if case == "exists":
        out.mkdir()
    prefixes = ["--prefix", "aux."] + (["--prefix", "vision."] if case == "prefix" else [])
    with pytest.raises(SystemExit, match=message):
        sc.main([str(tmp_path / "base"), str(donor), str(out), *prefixes])
    if case != "exists":
        assert not out.exists()  # nothing half-written
