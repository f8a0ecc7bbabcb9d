"""Worker bodies for tests/test_intermediate_kd.py (real gloo process groups, world size 2).

The e2e models (tests/e2e_workers.py) with a 4-layer student (hidden 32) and the 4-layer teacher
(hidden 64), so every pair has a learned projection. PAIRS mixes the placements: at PP = 2
student layer 2 (stage 0) needs teacher layer 3 (stage 1) and student layer 3 (stage 1) needs
teacher layer 1 (stage 0), both sent point-to-point; 4:4 stays on stage 1. With two virtual
stages per rank (layers 1,3 on rank 0 and 2,4 on rank 1) 2:3 crosses and 3:1, 4:4 stay.

Gradients of the hidden-state term alone are measured by running the student's step with the
logit loss's gradient removed (:class:`HiddenOnly`); they are written as a checkpoint in the
student's own layout (the gradients stored in place of the weights) and read back at TP = 1,
where the float64 reference (:func:`reference`, an independent implementation on float64
copies of the same models) is computed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Sequence, Tuple

import torch

from tests.dist_harness import init_layout
from tests.e2e_workers import GBS, MBS, make_config

PAIRS = "2:3,3:1,4:4"
STUDENT = ("--num-layers", "4")
WEIGHT = 0.7  # --kd-intermediate-weight
# name -> (tp, pp, flags); each is run with --kd-intermediate-loss cosine and mse
LAYOUTS = {
    "tp2-sp": (2, 1, ("--sequence-parallel",)),
    "pp2": (1, 2, ()),
    "pp2-vpp": (1, 2, ("--num-layers-per-virtual-pipeline-stage", "1")),
}
LOSSES = ("cosine", "mse")


def _flags(loss: str, *extra: str) -> List[str]:
    return [*STUDENT, "--kd-intermediate-pairs", PAIRS, "--kd-intermediate-loss", loss,
            "--kd-intermediate-weight", str(WEIGHT), *extra]


def _setup(tp: int, pp: int, flags: Sequence[str], log=lambda line: None):
    from megakd.training.setup import setup

    config = make_config(tp, pp, int(os.environ["WORLD_SIZE"]), flags)
    return setup(config, init_layout(config), log=log)


class HiddenOnly:
    """The student's logit loss with its gradient removed (its value and report kept): the
    step's gradients are then those of the hidden-state term alone."""

    def __init__(self, loss) -> None:
        self.inner, self.kd = loss, loss.kd

    def __call__(self, *args):
        total, tokens, reported = self.inner(*args)
        return total * 0.0, tokens, reported


def _microbatches(state, dp_rank: int, dp_size: int):
    """The iteration's microbatches, their loss (and so KD) masks zeroed at every third token
    (offset by the sample id): masks that differ between samples and sequence shards."""
    from megakd.data import iteration_microbatches

    microbatches = iteration_microbatches(state.train_dataset, state.consumed_samples, GBS, MBS,
                                          dp_rank, dp_size, torch.device("cpu"))
    positions = torch.arange(microbatches[0].tokens.shape[1])
    return [dataclasses.replace(batch, loss_mask=batch.loss_mask * (
        (positions[None, :] + batch.sample_ids[:, None]) % 3 != 0).float())
        for batch in microbatches]


def _hidden_step(state) -> Tuple[Dict[str, float], List[torch.Tensor]]:
    """One forward-backward of the hidden term only: (reduced losses, this rank's gradients)."""
    from megatron.core import parallel_state

    from megakd.distill import reduce_reported

    state.step.loss = HiddenOnly(state.step.loss)
    for chunk in state.student:
        chunk.zero_grad_buffer()
    microbatches = _microbatches(state, parallel_state.get_data_parallel_rank(),
                                 parallel_state.get_data_parallel_world_size())
    losses = reduce_reported(state.step.run(microbatches),
                             parallel_state.get_data_parallel_group())
    grads = [p.main_grad.detach().clone() for c in state.student for p in c.parameters()]
    return losses, grads


def _save_gradients(state, grads: List[torch.Tensor], directory: str) -> None:
    """Write ``grads`` in place of the weights as a checkpoint of the student's layout."""
    from megakd.formats.checkpoints import save_model_weights

    params = [p for c in state.student for p in c.parameters()]
    kept = [p.data.clone() for p in params]
    with torch.no_grad():
        for param, grad in zip(params, grads):
            param.data.copy_(grad)
        save_model_weights(state.student, directory)
        for param, value in zip(params, kept):
            param.data.copy_(value)


def init_worker(rank: int, workdir: str) -> Dict[str, object]:
    """Shared initial weights. A plain 4-layer student (no pairs) is saved first; a run with
    pairs then starts from it with ``--pretrained-checkpoint``: its projections are absent
    there and keep their seeded initialisation; that run's weights are the shared init."""
    from megakd.distill import HiddenProjection
    from megakd.formats.checkpoints import save_model_weights

    plain = _setup(1, 2, STUDENT)
    save_model_weights(plain.student, f"{workdir}/plain_student")
    save_model_weights(plain.teacher.chunks, f"{workdir}/teacher")
    logs: List[str] = []
    state = _setup(1, 2, _flags("cosine", "--pretrained-checkpoint", f"{workdir}/plain_student",
                                "--teacher-load", f"{workdir}/teacher"), log=logs.append)
    save_model_weights(state.student, f"{workdir}/init_student")
    hidden = state.step.hidden
    fresh = {layer: HiddenProjection(32, 64, 7, layer, torch.device("cpu")).weight
             for layer in hidden.projections}
    return {
        "projection_layers": sorted(hidden.projections),
        "projections_fresh": all(torch.equal(hidden.projections[n].weight, w)
                                 for n, w in fresh.items()),
        "absent_logged": any("no hidden-state projection" in line for line in logs),
        "transfers": hidden.transfers,
    }


def layouts_worker(rank: int, workdir: str) -> Dict[str, dict]:
    """Each layout and loss: the hidden loss of the first iteration and its gradients (saved
    to ``workdir/grads-<name>-<loss>``); PP = 2 also with --kd-teacher-window 1."""
    init = ["--load", f"{workdir}/init_student", "--teacher-load", f"{workdir}/teacher"]
    results: Dict[str, dict] = {}
    runs = [(f"{name}-{loss}", tp, pp, _flags(loss, *init, *extra))
            for name, (tp, pp, extra) in LAYOUTS.items() for loss in LOSSES]
    runs.append(("pp2-window1-cosine", 1, 2, _flags("cosine", *init, "--kd-teacher-window",
                                                     "1")))
    for label, tp, pp, flags in runs:
        state = _setup(tp, pp, flags)
        losses, grads = _hidden_step(state)
        if "window" not in label:
            _save_gradients(state, grads, f"{workdir}/grads-{label}")
        results[label] = {"losses": losses,
                          "grads": torch.cat([g.flatten() for g in grads]).numpy().tobytes(),
                          "windows": state.step.window}
    return results


def resume_worker(rank: int, workdir: str) -> Dict[str, object]:
    """PP = 2 with projections: three iterations saving at 2 and 3, and a run resumed from
    the checkpoint at 2; losses and every weight (projections included) per rank."""
    from megatron.core import dist_checkpointing

    from megakd.formats.checkpoints import checkpoint_name
    from megakd.training.loop import train

    def run(extra: Sequence[str]):
        state = _setup(1, 2, _flags("mse", "--teacher-load", f"{workdir}/teacher",
                                    "--train-iters", "3", *extra))
        history = train(state, log=lambda line: None)
        params = torch.cat([p.detach().flatten() for c in state.student for p in c.parameters()])
        return [r.losses for r in history.records], params.numpy().tobytes(), state

    root = f"{workdir}/resume"
    full, full_params, state = run(["--load", f"{workdir}/init_student", "--save", root,
                                    "--save-interval", "2"])
    resumed, resumed_params, _ = run(["--load", f"{root}/{checkpoint_name(2)}"])
    stored = dist_checkpointing.load_tensors_metadata(f"{root}/{checkpoint_name(2)}")
    return {"full": full, "resumed": resumed, "same_params": full_params == resumed_params,
            "projection_keys": sorted(k for k in stored if k.startswith("kd_projections")),
            "local_projections": sorted(state.step.hidden.projections)}


def _capture(chunk, layers: Sequence[int], store: Dict[int, torch.Tensor]):
    """Test-only forward hooks: the output of each TransformerLayer in ``layers``."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    def hook(number):
        return lambda module, args, output: store.__setitem__(number, output[0])

    return [m.register_forward_hook(hook(m.layer_number)) for m in chunk.modules()
            if isinstance(m, TransformerLayer) and m.layer_number in layers]


def _float64_model(arch, config, directory: str, projections: bool):
    """A TP = 1 float64 copy of the checkpoint's model (and its projections)."""
    from megakd.distill import build_projections
    from megakd.formats.checkpoints import load_model_weights
    from megakd.models import build_gpt_chunks

    chunk = build_gpt_chunks(arch, config.parallel, 64, config.data.max_position_embeddings)[0]
    if projections:
        build_projections(config.kd, [chunk], 32, 64, 7, torch.device("cpu"))
    load_model_weights([chunk], directory)
    return chunk.double()


def reference(config, microbatches, loss: str, workdir: str
              ) -> Tuple[float, Dict[str, torch.Tensor]]:
    """Float64, one rank, written independently of megakd.distill.hidden: the hidden term's
    token mean (summed over pairs) and the gradients of ``WEIGHT`` times it."""
    student = _float64_model(config.student, config, f"{workdir}/init_student", True)
    teacher = _float64_model(config.teacher, config, f"{workdir}/teacher", False)
    pairs = config.kd.layer_pairs
    total, tokens = torch.zeros((), dtype=torch.float64), 0.0
    for batch in microbatches:
        taught: Dict[int, torch.Tensor] = {}
        learned: Dict[int, torch.Tensor] = {}
        hooks = _capture(teacher, [t for _, t in pairs], taught)
        with torch.no_grad():
            teacher(batch.tokens, batch.position_ids, None)
        hooks += _capture(student, [s for s, _ in pairs], learned)
        student(batch.tokens, batch.position_ids, None)
        for hook in hooks:
            hook.remove()
        mask = batch.loss_mask.double().t()  # [s, b]
        assert all(h.dtype == torch.float64 for h in (*learned.values(), *taught.values()))
        for s, t in pairs:
            x = learned[s] @ student.kd_projections[f"layer{s}"].weight.t()  # [s, b, h_t]
            y = taught[t]
            if loss == "cosine":
                per_token = 1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
            else:
                per_token = ((x - y) ** 2).mean(-1)
            total = total + (per_token * mask).sum()
        tokens += mask.sum().item()
    mean = total / tokens
    (WEIGHT * mean).backward()
    return mean.item(), {name: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
                         for name, p in student.named_parameters()}


def compare_worker(rank: int, workdir: str) -> Dict[str, object]:
    """At TP = 1 x DP = 2: the data-parallel run's hidden term; the float64 references; every
    layout's gradients read back at TP = 1; a model without projections (as the HF export
    builds it) loads a checkpoint that holds them. Arrays are returned as numpy (pickled by
    value: torch tensors would be passed by file descriptor, which dies with the worker)."""
    from megakd.distill import build_projections
    from megakd.formats.checkpoints import load_model_weights
    from megakd.models import build_student

    init = ["--load", f"{workdir}/init_student", "--teacher-load", f"{workdir}/teacher"]
    out: Dict[str, object] = {"grads": {}, "reference": {}}
    for loss in LOSSES:
        state = _setup(1, 1, _flags(loss, *init))
        losses, grads = _hidden_step(state)
        out[f"dp2-{loss}"] = {"losses": losses}
        _save_gradients(state, grads, f"{workdir}/grads-dp2-{loss}")
        out["reference"][loss] = reference(state.config, _microbatches(state, 0, 1), loss,
                                           workdir)
    for label in [f"{n}-{loss}" for n in ("dp2", *LAYOUTS) for loss in LOSSES]:
        chunks = build_student(state.config.student, state.config.parallel, 64, 16)
        build_projections(state.config.kd, chunks, 32, 64, 7, torch.device("cpu"))
        load_model_weights(chunks, f"{workdir}/grads-{label}")
        out["grads"][label] = {k: v.detach().double().numpy()
                               for k, v in chunks[0].named_parameters()}
    plain = build_student(state.config.student, state.config.parallel, 64, 16)
    load_model_weights(plain, f"{workdir}/grads-pp2-vpp-cosine")  # no error: subset of keys
    out["plain_keys"] = sorted(plain[0].state_dict())
    return out if rank == 0 else {}
