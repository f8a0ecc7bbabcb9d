"""The divergence registry and the public API of megakd.losses (single process, no TP)."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for extra in (str(ROOT), str(Path(__file__).resolve().parent)):
    if extra not in sys.path:
        sys.path.insert(0, extra)

import _losses_reference as ref  # noqa: E402

import megakd.losses as losses  # noqa: E402
from megakd.formats import topk as topk_format  # noqa: E402
from megakd.losses import (  # noqa: E402
    DIVERGENCES,
    Divergence,
    Parameter,
    divergence_parameters,
    make_divergence,
    teacher_topk,
    topk_divergence,
    vocab_parallel_divergence,
)
from megakd.losses.divergences import discover  # noqa: E402

BUILT_IN = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd", "akl")
F64 = torch.float64

# The example of docs/losses.md ("Adding a divergence"), with absolute imports because it is
# written into a temporary package here instead of megakd/losses/divergences/.
JEFFREYS = '''
"""Jeffreys divergence, the symmetrised KL.

value  J = KL(p || q) + KL(q || p) = F + R,  d = lq - lp
grad   dJ/dx_i = (q_i - p_i) + q_i (d_i - R)
"""

from typing import Tuple

import torch

from megakd.losses.divergences.base import Block, Divergence, row_sum


class Jeffreys(Divergence):
    name = "jeffreys"
    summary = "Jeffreys KL(p, q) + KL(q, p): symmetric, mean- and mode-seeking at once"
    n_terms = 2
    f_divergence = True

    def partial_sums(self, block: Block) -> torch.Tensor:  # [F, R]
        fkl = row_sum(block.d.mul(block.p)).neg_()
        rkl = row_sum(block.d.mul(block.q))
        return torch.stack([fkl, rkl], dim=-1)

    def finalize(self, totals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return totals[:, 0] + totals[:, 1], totals[:, 1:2].clone()  # value, aux = [R]

    def logit_grad(self, block: Block, aux: torch.Tensor) -> torch.Tensor:
        return (block.d - aux[:, 0:1]).mul_(block.q).add_(block.q - block.p)
'''


def test_public_api() -> None:
    assert sorted(losses.__all__) == sorted([
        "DIVERGENCES", "Divergence", "Parameter", "TeacherTopK", "divergence_parameters",
        "make_divergence", "teacher_topk", "topk_bytes_per_token", "topk_divergence",
        "vocab_parallel_cross_entropy", "vocab_parallel_divergence"])
    assert losses.TeacherTopK is topk_format.TeacherTopK
    assert topk_format.TOPK_VALUE_DTYPES == {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
    assert set(topk_format.TeacherTopK.__dataclass_fields__) == {
        "logprobs", "indices", "tail_logprob", "temperature"}


def test_registry_order_and_classes() -> None:
    assert tuple(DIVERGENCES)[: len(BUILT_IN)] == BUILT_IN
    for name, cls in DIVERGENCES.items():
        assert issubclass(cls, Divergence) and cls.name == name
        assert cls.summary and "\n" not in cls.summary, name
        assert isinstance(cls.n_terms, int) and cls.n_terms >= 1, name


@pytest.mark.parametrize("kind", list(DIVERGENCES))
def test_every_kind_has_a_reference(kind: str) -> None:
    assert kind in ref.REFERENCES, (
        f"divergence {kind!r} has no float64 reference in tests/_losses_reference.py")


def test_parameters() -> None:
    params = {p.name: p for p in divergence_parameters()}
    assert list(params) == ["skew_alpha", "jsd_beta", "akl_mu"]
    expected = {"skew_alpha": ("--kd-skew-alpha", 0.1, 0.0, 1.0, True, False),
                "jsd_beta": ("--kd-jsd-beta", 0.5, 0.0, 1.0, False, False),
                "akl_mu": ("--kd-akl-mu", 0.5, 0.0, 1.0, False, False)}
    for name, (flag, default, low, high, low_in, high_in) in expected.items():
        p = params[name]
        assert (p.flag, p.default, p.low, p.high, p.low_inclusive, p.high_inclusive) == (
            flag, default, low, high, low_in, high_in)
        assert p.help and p.name.isidentifier() and p.check(p.default) is None
    assert DIVERGENCES["skl"].parameters[0] is DIVERGENCES["srkl"].parameters[0]
    assert params["skew_alpha"].check(1.5) == "--kd-skew-alpha must be in [0, 1), got 1.5"
    assert params["skew_alpha"].check(0.0) is None
    assert params["jsd_beta"].check(0.0) == "--kd-jsd-beta must be in (0, 1), got 0"
    assert params["akl_mu"].check(1.0) == "--kd-akl-mu must be in (0, 1), got 1"


def test_make_divergence() -> None:
    skl = make_divergence("skl", {"skew_alpha": 0.3, "jsd_beta": 0.9})  # others ignored
    assert skl.skew_alpha == 0.3 and skl.values == {"skew_alpha": 0.3}
    assert make_divergence("akl").akl_mu == 0.5  # default
    assert make_divergence("fkl", {"skew_alpha": 5.0}).values == {}
    assert make_divergence("jsd", {"jsd_beta": 0.25}) == make_divergence("jsd", {"jsd_beta": 0.25})
    with pytest.raises(ValueError, match=r"--kd-skew-alpha must be in \[0, 1\), got 1"):
        make_divergence("srkl", {"skew_alpha": 1.0})
    with pytest.raises(ValueError, match=r"--kd-jsd-beta must be in \(0, 1\), got 0"):
        make_divergence("jsd", {"jsd_beta": 0.0})
    with pytest.raises(ValueError) as err:
        make_divergence("kl")
    assert str(err.value) == ("unknown divergence 'kl'; expected one of "
                              + ", ".join(DIVERGENCES))


def test_argument_errors() -> None:
    x = torch.randn(2, 3, 10)
    with pytest.raises(TypeError):
        vocab_parallel_divergence(x, x, "fkl")  # a Divergence, not its name
    with pytest.raises(ValueError):
        topk_divergence(x, teacher_topk(x, 3, temperature=2.0), make_divergence("fkl"),
                        temperature=1.0)
    with pytest.raises(ValueError):
        teacher_topk(x, 11)
    with pytest.raises(ValueError):
        teacher_topk(x, 3, dtype=torch.float16)
    assert isinstance(teacher_topk(x, 3), losses.TeacherTopK)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module or ""


def test_layering() -> None:
    """megakd.losses imports nothing of megakd but megakd.formats.topk, which imports only
    torch (and the standard library)."""
    for path in sorted((ROOT / "megakd" / "losses").rglob("*.py")):
        outside = [m for m in _imports(path) if m.startswith("megakd")]
        assert set(outside) <= {"megakd.formats.topk"}, (path, outside)
    third_party = {m.split(".")[0] for m in _imports(ROOT / "megakd" / "formats" / "topk.py")}
    assert third_party <= {"__future__", "dataclasses", "typing", "torch"}, third_party


def test_adding_a_divergence_is_one_file(tmp_path: Path, monkeypatch) -> None:
    """The docs' recipe: one module with one Divergence subclass is found, ordered after the
    built-ins, and its math matches its float64 reference, dense and top-k."""
    package = tmp_path / "kd_plugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "jeffreys.py").write_text(textwrap.dedent(JEFFREYS))
    (package / "_helpers.py").write_text("X = 1\n")  # private modules are skipped
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover([str(package)], "kd_plugins")
    assert list(found) == ["jeffreys"] and found["jeffreys"].order > DIVERGENCES["akl"].order
    jeffreys = found["jeffreys"]()

    with pytest.raises(KeyError, match="jeffreys"):  # no reference yet: fails loudly
        ref.divergence(torch.zeros(1, 2), torch.zeros(1, 2), "jeffreys", {})
    monkeypatch.setitem(ref.REFERENCES, "jeffreys",
                        lambda lq, lp, params, n_top=None: ref.kl(lp, lq) + ref.kl(lq, lp))
    g = torch.Generator().manual_seed(3)
    student = torch.randn(3, 4, 40, generator=g) * 3
    teacher = torch.randn(3, 4, 40, generator=g) * 3
    for k in (None, 6):
        x = student.clone().requires_grad_(True)
        if k is None:
            value = vocab_parallel_divergence(x, teacher, jeffreys, valid_vocab_size=37)
        else:
            tk = teacher_topk(teacher, k, valid_vocab_size=37, dtype=torch.float32)
            value = topk_divergence(x, tk, jeffreys, valid_vocab_size=37)
        value.sum().backward()
        v64, g64 = ref.value_and_grad(student, teacher, "jeffreys", {}, temperature=1.0,
                                      valid=37, k=k)
        torch.testing.assert_close(value.to(F64), v64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.to(F64), g64, rtol=1e-5, atol=1e-6)

    (package / "broken.py").write_text("X = 1\n")  # a kind module must define one kind
    with pytest.raises(ImportError, match="exactly one Divergence subclass"):
        discover([str(package)], "kd_plugins")


def test_parameter_dataclass() -> None:
    p = Parameter(name="x", flag="--x", default=0.0, low=-1.0, high=2.0, low_inclusive=False,
                  high_inclusive=True, help="h")
    assert p.interval == "(-1, 2]" and p.check(2.0) is None and p.check(-1.0) is not None
    with pytest.raises(ValueError, match="no parameter"):
        DIVERGENCES["jsd"](skew_alpha=0.2)


@pytest.mark.parametrize("kind, params", [
    ("skl", {"skew_alpha": 0.0}), ("skl", {"skew_alpha": 0.7}),
    ("srkl", {"skew_alpha": 0.0}), ("srkl", {"skew_alpha": 0.7}),
    ("jsd", {"jsd_beta": 0.1}), ("jsd", {"jsd_beta": 0.9}),
    ("akl", {"akl_mu": 0.2}), ("akl", {"akl_mu": 0.9}),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_non_default_parameters(kind: str, params) -> None:
    """Parameters reach the math, bounds included (skew 0: skl is fkl, srkl is rkl)."""
    div = make_divergence(kind, params)
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, 5, 30, generator=g) * 3
    teacher = torch.randn(2, 5, 30, generator=g) * 3 + 0.5 * student
    for k, renormalize in ((None, False), (4, False), (4, True)):
        x = student.clone().requires_grad_(True)
        if k is None:
            value = vocab_parallel_divergence(x, teacher, div, temperature=2.0)
        else:
            tk = teacher_topk(teacher, k, temperature=2.0, dtype=torch.float32)
            value = topk_divergence(x, tk, div, temperature=2.0, renormalize=renormalize)
        value.sum().backward()
        v64, g64 = ref.value_and_grad(student, teacher, kind, div.values, temperature=2.0,
                                      valid=30, k=k, renormalize=renormalize)
        torch.testing.assert_close(value.to(F64), v64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.to(F64), g64, rtol=1e-5, atol=2e-6)
    if params.get("skew_alpha") == 0.0:  # the mixture degenerates to the other distribution
        plain = make_divergence({"skl": "fkl", "srkl": "rkl"}[kind])
        torch.testing.assert_close(vocab_parallel_divergence(student, teacher, div),
                                   vocab_parallel_divergence(student, teacher, plain))
