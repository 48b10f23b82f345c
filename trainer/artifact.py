"""The exported model that travels from the train phase to the score phase, and its checks.

Format (a folder): model.json, the graph of the model's forward (tokens -> logits) as torch.export's
serializer writes it (JSON: no code, no pickle), and weights.safetensors, its parameters, buffers
and constants (safetensors: raw tensors, no pickle). torch.export.save is not used: its loader
unpickles weights with weights_only=False, so an artifact could run code when loaded.

The scorer refuses an artifact before anything in it is loaded: any file but these two, a
weights file that is not safetensors, or a graph node whose target is not a tensor op (aten,
prims), one of trainer's registered ops (trainer.ops) or a small set of pure Python operators. It
refuses a graph that is not a pure function of its tokens too (state, in-place writes, random ops):
the causality audit (trainer.audit) calls it many times and must question the model it scored.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from torch.export.graph_signature import OutputKind

from trainer.config import TrainerError
from trainer.contract import ARTIFACT_FILES

GRAPH_FILE, WEIGHTS_FILE = ARTIFACT_FILES
MAX_GRAPH_BYTES = 64 << 20
SAFETENSORS_HEADER_MAX = 100 << 20

# pure Python helpers the export writes for shape arithmetic
PY_OPS = {f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg",
                                     "pow", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")}
PY_OPS |= {f"math.{n}" for n in ("ceil", "floor", "sqrt", "trunc")}
PY_OPS |= {f"torch.{n}" for n in ("sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_sqrt",
                                  "sym_ite", "_sym_sqrt")}
# aten ops that reach outside the tensors they are given
FORBIDDEN_ATEN = {"from_file", "_print", "save", "_nested_tensor_from_tensor_list"}
OP_TARGET = re.compile(r"^torch\.ops\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)(\.[A-Za-z_][A-Za-z0-9_]*)?$")


class ArtifactInvalid(TrainerError, ValueError):
    """The artifact is refused: it is not what the harness writes, or calls a forbidden op."""


class ArtifactUnscorable(TrainerError, ValueError):
    """The artifact calls an op the scorer does not know, or cannot be rebuilt."""


class ExportFailed(TrainerError, RuntimeError):
    """The submitted model could not be exported (data-dependent control flow, an unsupported op)."""


HINT = ("the submitted model's forward must be exportable with torch.export: tensor ops, trainer.ops "
        "(window_attention, relu2_mlp) and fixed shapes, with no Python branches on tensor values and "
        "no custom ops of train.py's own; train with anything you like, but submit a model made of those")


# -- export (train phase) --------------------------------------------------------------------------

def export_model(model: torch.nn.Module, example: torch.Tensor, folder: Path) -> None:
    """Export model(example) -> logits into `folder` (created); raise ExportFailed with the reason."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper: export what it wraps
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # functional: in-place ops become pure ones, and a write to the model's own state shows as such
            program = torch.export.export(model, (example,), strict=False).run_decompositions({})
    except Exception as e:  # noqa: BLE001 — every export failure is the run's, with its reason
        raise ExportFailed(f"torch.export failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from e
    finally:
        model.train(was_training)
    try:
        check_pure(program)
    except ArtifactInvalid as e:
        raise ExportFailed(str(e)) from e
    from torch._export.serde.serialize import serialize

    try:
        try:  # the graph alone (torch >= 2.13); the weights travel as safetensors below
            graph = serialize(program, serialize_state_dict=False, serialize_constants=False,
                              serialize_example_inputs=False).exported_program
        except TypeError:  # older torch serializes the weights too (pickled): only the graph is kept
            graph = serialize(program).exported_program
    except Exception as e:  # noqa: BLE001
        raise ExportFailed(f"the exported graph cannot be serialized: {type(e).__name__}: {e}") from e
    tensors = {}
    params = set(program.graph_signature.parameters)
    for kind, table in (("state", program.state_dict), ("const", program.constants)):
        for name, value in table.items():
            kind = "param" if name in params else kind
            if not isinstance(value, torch.Tensor):
                raise ExportFailed(f"the exported model holds a {type(value).__name__} constant {name!r}: "
                                   "only tensors can travel to the scorer")
            tensors[f"{kind}:{name}"] = value.detach()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / GRAPH_FILE).write_bytes(graph)
    _save_tensors(tensors, folder / WEIGHTS_FILE)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses tensors that share storage (tied weights): store each storage once and
    name its aliases in the metadata."""
    from safetensors.torch import save_file

    unique, aliases, seen = {}, {}, {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = t.contiguous()
    save_file(unique, str(path), metadata={"aliases": json.dumps(aliases)})


# -- checks and loading (score phase) ---------------------------------------------------------------

def check_files(folder: Path) -> None:
    present = sorted(p.name for p in folder.iterdir())
    if present != sorted(ARTIFACT_FILES):
        raise ArtifactInvalid(f"the artifact holds {present}; only {list(ARTIFACT_FILES)} are accepted")
    with open(folder / WEIGHTS_FILE, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactInvalid("weights.safetensors is empty")
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= SAFETENSORS_HEADER_MAX or f.read(1) != b"{":
            raise ArtifactInvalid("weights.safetensors is not a safetensors file (a pickle, say): refused unread")


def graph_targets(graph: dict) -> set[str]:
    """Every call target of every node, nested graphs (higher-order ops) included."""
    found: set[str] = set()
    stack = [graph]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("target"), str) and "inputs" in item and "outputs" in item:
                found.add(item["target"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def check_targets(targets: set[str], trusted_ops: set[str]) -> None:
    """Raise ArtifactInvalid for a forbidden target, ArtifactUnscorable for an unknown op."""
    unknown = []
    for target in sorted(targets):
        if target in PY_OPS:
            continue
        m = OP_TARGET.match(target)
        if m is None:
            raise ArtifactInvalid(f"the graph calls {target!r}, which is not a tensor op: refused")
        namespace, op = m.group(1), m.group(2)
        if namespace == "aten" and op in FORBIDDEN_ATEN:
            raise ArtifactInvalid(f"the graph calls {target}, which reaches outside its tensors: refused")
        if namespace in ("aten", "prims") or f"{namespace}.{op}" in trusted_ops:
            continue
        unknown.append(target.removeprefix("torch.ops."))
    if unknown:
        raise ArtifactUnscorable(f"the submitted forward calls {', '.join(unknown)}, which the scorer does not "
                                 f"know; use trainer.ops or plain torch ops in the model you submit ({HINT})")


def check_pure(program) -> None:
    """Refuse a forward that is not a pure function of its tokens: one that writes to its own state
    or its input (the scorer calls it many times: state would let a call see what earlier ones were
    shown), or draws random numbers."""
    for spec in program.graph_signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise ArtifactInvalid(f"the submitted forward writes to {spec.target or 'its input'} "
                                  f"({spec.kind.name.lower()}): a scored model must be a pure function of its "
                                  "tokens, keeping no state from one call to the next")
    for gm in program.graph_module.modules():
        for node in getattr(getattr(gm, "graph", None), "nodes", ()):
            op = node.target
            if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
                continue
            if op._schema.is_mutable:
                raise ArtifactInvalid(f"the graph calls {op}, which writes into a tensor in place: a scored model "
                                      "must be a pure function of its tokens")
            if torch.Tag.nondeterministic_seeded in op.tags and _draws(node):
                raise ArtifactInvalid(f"the graph calls {op}, which draws random numbers: a scored model must give "
                                      "the same logits for the same tokens")


def _draws(node) -> bool:
    """Whether a node of a random-tagged op draws: attention kernels carry the tag for their dropout,
    which an eval graph sets to 0."""
    names = [a.name for a in node.target._schema.arguments]
    if "dropout_p" not in names:
        return True
    i = names.index("dropout_p")
    return node.kwargs.get("dropout_p", node.args[i] if len(node.args) > i else 0.0) != 0


def load_model(folder: Path, device: torch.device, trusted_ops: set[str]) -> torch.nn.Module:
    """Check the artifact, then rebuild its forward as a module on `device` (no pickle, no train.py code)."""
    check_files(folder)
    raw = (folder / GRAPH_FILE).read_bytes()
    if len(raw) > MAX_GRAPH_BYTES:
        raise ArtifactInvalid(f"model.json is {len(raw)} bytes, more than {MAX_GRAPH_BYTES}")
    try:
        graph = json.loads(raw)
    except ValueError as e:
        raise ArtifactInvalid(f"model.json is not JSON: {e}") from e
    check_targets(graph_targets(graph), trusted_ops)
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        tensors = load_file(str(folder / WEIGHTS_FILE), device=str(device))
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, ValueError, OSError) as e:
        raise ArtifactInvalid(f"weights.safetensors is unreadable: {e}") from e
    for name, source in aliases.items():
        tensors[name] = tensors[source]
    state = {k.split(":", 1)[1]: torch.nn.Parameter(v, requires_grad=False) if k.startswith("param:") else v
             for k, v in tensors.items() if k.startswith(("param:", "state:"))}
    consts = {k.split(":", 1)[1]: v for k, v in tensors.items() if k.startswith("const:")}
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass

    try:
        program = ExportedProgramDeserializer().deserialize(
            _bytes_to_dataclass(schema.ExportedProgram, raw), state, consts, None)
    except Exception as e:  # noqa: BLE001 — a graph we cannot rebuild is not scored
        raise ArtifactUnscorable(f"the exported graph cannot be rebuilt: {type(e).__name__}: {e}") from e
    check_pure(program)
    try:
        module = program.module()
    except Exception as e:  # noqa: BLE001
        raise ArtifactUnscorable(f"the exported graph cannot be rebuilt: {type(e).__name__}: {e}") from e
    return Exported(module.to(device))


class Exported(torch.nn.Module):
    """The rebuilt forward. It was exported in eval mode, which it keeps: train()/eval() change nothing
    (an exported module refuses them)."""

    def __init__(self, graph: torch.nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> Exported:
        return self

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.graph(idx)
