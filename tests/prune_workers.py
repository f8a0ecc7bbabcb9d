"""Worker bodies for tests/test_prune.py (run on real gloo process groups by dist_harness).

A tiny random GPT (4 layers, hidden 32, 8 heads in 4 query groups, SwiGLU FFN 64, RMSNorm,
RoPE, untied embeddings; init std 0.2 so activations differ between channels) is saved as the
source; mock data (NullTokenizer, 100 ids + EOD, padded to 128) calibrates. Each task switches
layouts inside the running process group and returns plain values compared by the test.

The ModelOpt comparison (:func:`modelopt_task`, one process) applies, here only, the three
compat fixes nvidia-modelopt 0.43 needs for megakd's local-spec model (issue 14): a dynamic
norm for torch ``LayerNorm``/``RMSNorm`` that takes the shared ``num_features`` hparam, megatron's
own ``DotProductAttention`` as core attention (``--attention-backend unfused``), and a 0-d
``all_gather_into_tensor`` (refused by gloo) sent as 1-d.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Dict, List, Optional, Sequence

import torch

from megakd.configs import ModelArchConfig, ParallelConfig, PruneConfig, RuntimeConfig
from megakd.configs.prune import pruned_architecture
from megakd.formats.checkpoints import (
    checkpoint_name,
    load_model_weights,
    save_model_weights,
    write_tracker,
)
from megakd.formats.model_metadata import arch_from_metadata, model_metadata, read_model_metadata
from megakd.models import build_gpt_chunks
from megakd.preflight import parse_prune_args
from megakd.prune import (
    REPORT_FILENAME,
    StatisticsCollector,
    calibrate,
    gather_statistics,
    importance_from,
    measure_importance,
    PruningPlan,
    layer_left_out,
    plan_pruning,
    run_prune,
    write_pruned_checkpoint,
)
from megakd.runtime import initialize_for

SEQ = 32
PADDED = 128
CPU = torch.device("cpu")
SOURCE = ModelArchConfig(num_layers=4, hidden_size=32, num_attention_heads=8, num_query_groups=4,
                         ffn_hidden_size=64, swiglu=True, normalization="RMSNorm",
                         position_embedding_type="rope", add_bias_linear=False,
                         untie_embeddings_and_output_weights=True, init_method_std=0.2,
                         vocab_size=100)
# LayerNorm with biases, learned positions, tied embeddings, plain GeLU MLP, MHA, q/k norms:
# every other slicing rule.
SOURCE_B = ModelArchConfig(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                           normalization="LayerNorm", add_bias_linear=True, qk_layernorm=True,
                           position_embedding_type="learned_absolute", init_method_std=0.2,
                           vocab_size=100)
TARGETS = ["--target-num-layers", "2", "--target-hidden-size", "24",
           "--target-ffn-hidden-size", "48", "--target-num-attention-heads", "4"]
DATA = ["--seq-length", str(SEQ), "--mock-data", "--vocab-size", "100", "--device", "cpu",
        "--micro-batch-size", "2", "--calib-batches", "8"]


def prune_argv(load: str, save: str, tp: int = 1, pp: int = 1,
               extra: Sequence[str] = TARGETS) -> List[str]:
    return ["--load", load, "--save", save, "--tensor-model-parallel-size", str(tp),
            "--pipeline-model-parallel-size", str(pp), *DATA, *extra]


def use_layout(tp: int, pp: int, num_layers: int) -> ParallelConfig:
    """(Re)build megatron's groups for TP x PP (DP = the rest) inside the running world."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              world_size=int(os.environ["WORLD_SIZE"]))
    initialize_for(parallel, RuntimeConfig(device="cpu"), 1234, num_layers)
    return parallel


def _model(arch: ModelArchConfig, parallel: ParallelConfig, backend: str = "sdpa"):
    chunks = build_gpt_chunks(arch, parallel, PADDED, SEQ, attention_backend=backend)
    for chunk in chunks:
        chunk.eval()
    return chunks


def make_source(rank: int, root: str, arch: ModelArchConfig = SOURCE, tp: int = 1,
                pp: int = 1) -> str:
    """A random source model saved at TP x PP as a release checkpoint root."""
    parallel = use_layout(tp, pp, arch.num_layers)
    chunks = _model(arch, parallel)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
    save_model_weights(chunks, os.path.join(root, checkpoint_name(None)),
                       model_metadata(arch, PADDED))
    if rank == 0:
        write_tracker(root, None)
    torch.distributed.barrier()
    return root


def importance_task(rank: int, load: str, layouts: Sequence[tuple]) -> Dict[str, dict]:
    """Per (tp, pp, rankings): the importance scores and the plan measured at that layout, with
    each layer ranking asked for."""
    out = {}
    for tp, pp, rankings in layouts:
        scores = {}
        for ranking in rankings:
            config = parse_prune_args(prune_argv(load, load + ".never", tp, pp,
                                                 TARGETS + ["--layer-importance", ranking]),
                                      world_size=int(os.environ["WORLD_SIZE"]))
            use_layout(tp, pp, config.model.num_layers)
            importance, figures = measure_importance(config, PADDED, CPU, log=lambda _: None)
            plan = plan_pruning(importance, config.model, config.prune)
            scores[ranking] = {"plan": plan.as_json(), "layers": importance.layers,
                               "hidden": importance.hidden.tolist(),
                               "heads": {k: v.tolist() for k, v in importance.heads.items()},
                               "ffn": {k: v.tolist() for k, v in importance.ffn.items()},
                               "lm_loss": figures["lm_loss"]}
        out[f"tp{tp}pp{pp}"] = scores
    return out


def prune_task(rank: int, runs: Sequence[List[str]]) -> List[dict]:
    """``tools/prune.py``'s path in-process for each argv (layout from the argv); the plans."""
    plans = []
    for argv in runs:
        config = parse_prune_args(argv, world_size=int(os.environ["WORLD_SIZE"]))
        use_layout(config.parallel.tensor_model_parallel_size,
                   config.parallel.pipeline_model_parallel_size, config.model.num_layers)
        plans.append(run_prune(config, CPU, log=lambda _: None).as_json())
    return plans


def _full_logits(chunks, tokens: torch.Tensor) -> Optional[List]:
    """Full-vocabulary logits ``[b, s, V]`` on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    group = parallel_state.get_tensor_model_parallel_group()

    def gather(logits, non_loss_data=True):
        parts = [torch.empty_like(logits) for _ in range(group.size())]
        torch.distributed.all_gather(parts, logits.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    def step(iterator, model):
        batch = next(iterator)
        return model(batch, torch.arange(SEQ).expand_as(batch), None), gather

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([tokens]), model=chunks,
            num_microbatches=1, seq_length=SEQ, micro_batch_size=tokens.shape[0],
            forward_only=True, collect_non_loss_data=True)
    return outputs[0].tolist() if outputs else None


def logits_task(rank: int, checkpoints: Sequence[str], layouts: Sequence[tuple]
                ) -> Dict[str, Optional[list]]:
    """Logits of each checkpoint loaded at each (tp, pp) layout, for one fixed batch."""
    tokens = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(5))
    out = {}
    for path in checkpoints:
        arch, _, _ = arch_from_metadata(read_model_metadata(os.path.join(path, "release")))
        for tp, pp in layouts:
            chunks = _model(arch, use_layout(tp, pp, arch.num_layers))
            load_model_weights(chunks, path)
            out[f"{path}|tp{tp}pp{pp}"] = _full_logits(chunks, tokens)
    return out


def masked_reference_task(rank: int, source: str, pruned: str) -> dict:
    """Logits of the source at TP=1 with the pruned plan applied by masking (dropped heads'
    and neurons' output columns zeroed, dropped layers passing their input through), and of
    the pruned checkpoint: equal when nothing prunes hidden channels."""
    with open(os.path.join(pruned, "release", REPORT_FILENAME)) as handle:
        plan = PruningPlan.from_json(json.load(handle)["plan"])
    chunks = _model(SOURCE, use_layout(1, 1, SOURCE.num_layers))
    load_model_weights(chunks, source)
    d = SOURCE.head_dim
    with torch.no_grad():
        for layer in chunks[0].decoder.layers:
            index = layer.layer_number - 1
            if index not in plan.heads:
                continue
            heads = set(plan.heads[index])
            for head in set(range(SOURCE.num_attention_heads)) - heads:
                layer.self_attention.linear_proj.weight[:, head * d:(head + 1) * d] = 0
            dropped = sorted(set(range(SOURCE.ffn_hidden_size)) - set(plan.ffn[index]))
            layer.mlp.linear_fc2.weight[:, dropped] = 0
    tokens = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(5))
    left_out = sorted(set(range(SOURCE.num_layers)) - set(plan.layers))
    with contextlib.ExitStack() as stack:
        for layer in left_out:
            stack.enter_context(layer_left_out(chunks, layer))
        masked = _full_logits(chunks, tokens)
    pruned_arch, _, _ = arch_from_metadata(read_model_metadata(os.path.join(pruned, "release")))
    small = _model(pruned_arch, use_layout(1, 1, pruned_arch.num_layers))
    load_model_weights(small, pruned)
    return {"masked": masked, "pruned": _full_logits(small, tokens)}


# ----------------------------------------------------------------------------------------------
# ModelOpt's mcore_minitron on the same model and calibration data (TP = PP = 1)
# ----------------------------------------------------------------------------------------------


def modelopt_missing() -> Optional[str]:
    """Why ModelOpt cannot be compared here (None: it imports)."""
    try:
        import modelopt.torch.prune  # noqa: F401
    except Exception as error:  # ImportError, or a broken install
        return f"nvidia-modelopt does not import ({type(error).__name__}: {error})"
    return None


def _modelopt_compat_fixes() -> None:
    """The three fixes ModelOpt 0.43 needs for megakd's local-spec model on gloo (this
    process only): see the module doc. Megatron's DotProductAttention is chosen when the model
    is built (``attention_backend="unfused"``)."""
    import torch.nn as nn
    from modelopt.torch.nas.modules.norm import _DynamicLayerNorm
    from modelopt.torch.nas.registry import DMRegistry

    class SharedWidthNorm(_DynamicLayerNorm):
        """torch LayerNorm / RMSNorm whose width is the model's shared hidden-size hparam."""

        def _setup(self, *, num_features=None):
            if num_features is None:
                return super()._setup()
            self._register_hparam("num_features", num_features)
            for name in ("weight", "bias"):
                if name in self._parameters:
                    self._register_dynamic_attribute(name, self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

    if DMRegistry.get(nn.RMSNorm) is None:
        DMRegistry.unregister(nn.LayerNorm)
        DMRegistry.register({nn.LayerNorm: "nn.LayerNorm", nn.RMSNorm: "nn.RMSNorm"})(
            SharedWidthNorm)
    gather = torch.distributed.all_gather_into_tensor

    def gather_1d(output, tensor, *args, **kwargs):
        return gather(output, tensor.reshape(1) if tensor.dim() == 0 else tensor, *args, **kwargs)

    torch.distributed.all_gather_into_tensor = gather_1d


def _columns(pruned: torch.Tensor, original: torch.Tensor, width: int) -> List[int]:
    """For each block of ``width`` columns of ``pruned``, the index of the equal block of
    ``original`` (ModelOpt reorders what it keeps by importance)."""
    blocks = original.shape[1] // width
    return [next(j for j in range(blocks) if torch.equal(pruned[:, i * width:(i + 1) * width],
                                                         original[:, j * width:(j + 1) * width]))
            for i in range(pruned.shape[1] // width)]


def _modelopt_choices(model, original: Dict[str, torch.Tensor], layer_ids: Dict[int, int],
                      arch: ModelArchConfig) -> dict:
    """What ModelOpt kept, read back from its pruned weights: hidden channels (embedding
    columns), layers, and per layer its heads (``linear_proj`` column blocks) and neurons."""
    state = model.state_dict()
    hidden = _columns(state["embedding.word_embeddings.weight"],
                      original["embedding.word_embeddings.weight"], 1)
    layers = [layer_ids[id(layer)] for layer in model.decoder.layers]
    heads, ffn = {}, {}
    for new, old in enumerate(layers):
        prefix, source = f"decoder.layers.{new}.", f"decoder.layers.{old}."
        heads[old] = sorted(_columns(state[prefix + "self_attention.linear_proj.weight"],
                                     original[source + "self_attention.linear_proj.weight"][hidden],
                                     arch.head_dim))
        ffn[old] = sorted(_columns(state[prefix + "mlp.linear_fc2.weight"],
                                   original[source + "mlp.linear_fc2.weight"][hidden], 1))
    return {"layers": sorted(layers), "hidden": sorted(hidden), "heads": heads, "ffn": ffn}


def modelopt_task(rank: int, workdir: str, arch: ModelArchConfig, prune: PruneConfig) -> dict:
    """megakd's and ModelOpt's choices on one model and calibration set, and the largest
    logit difference between megakd's pruned checkpoint and ModelOpt's pruned model."""
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

    model = _model(arch, use_layout(1, 1, arch.num_layers), backend="unfused")[0]
    source = make_source_from(model, arch, os.path.join(workdir, "source"))
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 100, (2, SEQ), generator=generator) for _ in range(4)]
    positions = torch.arange(SEQ).expand(2, SEQ)

    def forward_loop(m):
        with torch.no_grad():
            for tokens in batches:
                m(tokens, positions, None)

    collector = StatisticsCollector([model])
    forward_loop(model)
    collector.remove()
    plan = plan_pruning(importance_from(gather_statistics(collector.layers, CPU), arch.head_dim),
                        arch, prune)
    pruned = os.path.join(workdir, "megakd_pruned")
    small_arch = pruned_architecture(arch, prune)
    write_pruned_checkpoint(os.path.join(source, "release"), plan, arch.num_layers,
                            os.path.join(pruned, "release"), model_metadata(small_arch, PADDED))
    original = {k: v.clone() for k, v in model.state_dict().items() if "extra_state" not in k}
    layer_ids = {id(layer): layer.layer_number - 1 for layer in model.decoder.layers}
    _modelopt_compat_fixes()
    export = {"num_layers": small_arch.num_layers, "hidden_size": small_arch.hidden_size,
              "ffn_hidden_size": small_arch.ffn_hidden_size,
              "num_attention_heads": small_arch.num_attention_heads}
    mtp.prune(model, mode=[("mcore_minitron", get_mcore_minitron_config(
        hidden_size_divisor=1, ffn_hidden_size_divisor=1, num_layers_divisor=1))],
        constraints={"export_config": export}, dummy_input=None,
        config={"forward_loop": forward_loop})
    ours = _model(small_arch, use_layout(1, 1, small_arch.num_layers), backend="unfused")
    load_model_weights(ours, os.path.join(pruned, "release"))
    tokens = torch.randint(0, 100, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (ours[0](tokens, positions, None) - model(tokens, positions, None)).abs().max()
    return {"megakd": plan.as_json(), "modelopt": _modelopt_choices(model, original, layer_ids,
                                                                      arch),
            "logit_diff": float(diff)}


def make_source_from(model, arch: ModelArchConfig, root: str) -> str:
    os.makedirs(root, exist_ok=True)
    save_model_weights([model], os.path.join(root, checkpoint_name(None)),
                       model_metadata(arch, PADDED))
    write_tracker(root, None)
    return root
