"""Attention heads as removable units: find them, score them, cut them out, and load a model
whose heads were cut.

transformers 5 no longer has ``prune_heads`` (nor ``config.pruned_heads``), so this module
does it for the two layouts the platform trains:

- BERT (``model_type`` bert): each layer's ``attention.self.query/key/value`` hold one block
  of ``attention_head_size`` rows per head and ``attention.output.dense`` one block of
  columns; a removed head drops its rows and columns.
- Llama (``model_type`` llama): ``q_proj``/``o_proj`` per query head, ``k_proj``/``v_proj``
  per key/value head. With grouped-query attention each key/value head serves
  ``num_attention_heads / num_key_value_heads`` query heads, and the forward pass needs the
  same group size in every layer, so heads are removed by whole groups (a key/value head
  with its query heads; one query head each when there is no grouping).

What was removed is recorded in the model's config as ``pruned_heads`` (``{"<layer>":
[original head indices]}``), which ``save_pretrained`` writes to ``config.json``;
``load_pretrained`` rebuilds the model from that config, cuts the same heads, and only then
reads the (smaller) safetensors weights. Heads are counted in the unit removed: query heads
for BERT, key/value groups for Llama. No Ray, no stage imports: model loading uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEAD_MODEL_TYPES = ("bert", "llama")
"""``model_type`` values whose attention heads ``remove_heads`` can cut (tested on both)."""
PRUNED_HEADS = "pruned_heads"
"""The config attribute (saved in ``config.json``) naming each layer's removed heads."""


@dataclass
class HeadBlock:
    """One layer's attention, as the Linear layers a head unit spans."""

    layer: int
    module: Any  # the attention module whose attributes change with the head count
    rows: list[tuple[Any, str]]  # (parent, attribute) of Linears with a block of rows per unit
    kv_rows: list[tuple[Any, str]]  # Llama's k/v: a block of rows per key/value head
    cols: tuple[Any, str]  # (parent, attribute) of the output Linear: columns per unit
    head_dim: int
    group: int  # query heads per unit (1 for BERT)

    def linear(self, ref: tuple[Any, str]):
        return getattr(*ref)

    @property
    def units(self) -> int:
        return self.linear(self.cols).in_features // (self.head_dim * self.group)


def head_blocks(model) -> list[HeadBlock]:
    """Each transformer layer's attention, in layer order; ``[]`` for a layout not known."""
    blocks: list[HeadBlock] = []
    for _, module in model.named_modules():
        inner = getattr(module, "self", None)
        if inner is not None and all(hasattr(inner, a) for a in ("query", "key", "value")):
            blocks.append(
                HeadBlock(
                    layer=len(blocks),
                    module=inner,
                    rows=[(inner, "query"), (inner, "key"), (inner, "value")],
                    kv_rows=[],
                    cols=(module.output, "dense"),
                    head_dim=int(inner.attention_head_size),
                    group=1,
                )
            )
        elif all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            blocks.append(
                HeadBlock(
                    layer=len(blocks),
                    module=module,
                    rows=[(module, "q_proj")],
                    kv_rows=[(module, "k_proj"), (module, "v_proj")],
                    cols=(module, "o_proj"),
                    head_dim=int(module.head_dim),
                    group=int(getattr(module, "num_key_value_groups", 1)),
                )
            )
    return blocks


def head_scores(block: HeadBlock):
    """Each unit's L2 norm over the weights it owns: its rows of query/key/value (q_proj,
    and k_proj/v_proj for its key/value head) and its columns of the output projection.
    Biases are left out. A tensor of ``block.units`` scores."""
    import torch

    width = block.head_dim * block.group
    out = block.linear(block.cols).weight.detach().float()
    total = out.pow(2).reshape(out.shape[0], block.units, width).sum(dim=(0, 2))
    for ref in block.rows:
        w = block.linear(ref).weight.detach().float()
        total += w.pow(2).reshape(block.units, width, -1).sum(dim=(1, 2))
    for ref in block.kv_rows:
        w = block.linear(ref).weight.detach().float()
        total += w.pow(2).reshape(block.units, block.head_dim, -1).sum(dim=(1, 2))
    return torch.sqrt(total)


def _slice(linear, index, dim: int):
    """A new Linear holding only ``index`` of ``linear``'s outputs (dim 0) or inputs (dim 1)."""
    import torch

    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach()[index].clone()
    elif bias is not None:
        bias = bias.detach().clone()
    new = torch.nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _cut(block: HeadBlock, keep: list[int]) -> None:
    """Keep only units ``keep`` (current indices) of ``block``."""
    import torch

    device = block.linear(block.cols).weight.device
    width = block.head_dim * block.group

    def span(units: list[int], size: int):
        return torch.tensor(
            [u * size + i for u in units for i in range(size)], dtype=torch.long, device=device
        )

    for parent, name in block.rows:
        setattr(parent, name, _slice(getattr(parent, name), span(keep, width), 0))
    for parent, name in block.kv_rows:
        setattr(parent, name, _slice(getattr(parent, name), span(keep, block.head_dim), 0))
    parent, name = block.cols
    setattr(parent, name, _slice(getattr(parent, name), span(keep, width), 1))
    m = block.module
    if hasattr(m, "num_attention_heads"):  # BERT's self-attention; Llama's reads shapes
        m.num_attention_heads = len(keep) * block.group
    if hasattr(m, "all_head_size"):
        m.all_head_size = len(keep) * width


def remove_heads(model, remove: dict[int, list[int]]) -> dict[str, list[int]]:
    """Cut units ``remove[layer]`` (indices among the layer's current units) out of ``model``,
    in place, and record them in ``model.config.pruned_heads`` by their original indices
    (a model already pruned keeps its earlier removals). Returns that record.

    Raises:
        ValueError: an unknown layout, a layer or unit that does not exist, or every unit
            of a layer.
    """
    blocks = head_blocks(model)
    if not blocks:
        raise ValueError(
            f"no attention heads found in {type(model).__name__}; head removal supports "
            f"model types {', '.join(HEAD_MODEL_TYPES)}"
        )
    config = getattr(model, "config", None)
    record = {str(k): list(v) for k, v in (getattr(config, PRUNED_HEADS, None) or {}).items()}
    for layer, units in sorted(remove.items()):
        if not units:
            continue
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} does not exist (the model has {len(blocks)})")
        block = blocks[layer]
        current = block.units
        bad = [u for u in units if not 0 <= u < current]
        if bad:
            raise ValueError(f"layer {layer} has {current} heads; no head {bad[0]}")
        keep = [u for u in range(current) if u not in set(units)]
        if not keep:
            raise ValueError(f"removing every head of layer {layer} would leave no attention")
        earlier = record.get(str(layer), [])
        original = [u for u in range(current + len(earlier)) if u not in set(earlier)]
        record[str(layer)] = sorted(earlier + [original[u] for u in units])
        _cut(block, keep)
    if config is not None:
        setattr(config, PRUNED_HEADS, record)
    return record


def restore_structure(model) -> None:
    """Cut the heads ``model.config.pruned_heads`` names from a model freshly built from that
    config (every head present), so the saved weights fit it."""
    record = getattr(getattr(model, "config", None), PRUNED_HEADS, None) or {}
    if not record:
        return
    blocks = head_blocks(model)
    for layer, units in record.items():
        index = int(layer)
        if not 0 <= index < len(blocks) or not units:
            continue
        keep = [u for u in range(blocks[index].units) if u not in set(units)]
        _cut(blocks[index], keep)


def has_pruned_heads(folder: str | Path) -> bool:
    """Whether the ``config.json`` in ``folder`` records removed heads."""
    import json

    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    return bool(json.loads(path.read_text()).get(PRUNED_HEADS))


def load_pretrained(auto_cls, folder: str | Path, dtype=None):
    """``auto_cls.from_pretrained(folder)`` (safetensors only), or for a config that records
    ``pruned_heads``: the model built from the config, those heads cut, then its weights
    read (every stored tensor must fit; only tied ones may be absent)."""
    import torch

    folder = Path(folder)
    extra = {} if dtype is None else {"dtype": dtype}
    if not has_pruned_heads(folder):
        return auto_cls.from_pretrained(folder, use_safetensors=True, **extra)
    from safetensors.torch import load_file
    from transformers import AutoConfig

    model = auto_cls.from_config(AutoConfig.from_pretrained(folder))
    restore_structure(model)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied output head is stored once (as the embedding it shares): absent, not missing.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(p) for name, p in params.items() if name in state}
    absent = {k for k in missing if not (k in params and id(params[k]) in loaded)}
    if unexpected or absent:
        from lepton_ray.errors import StageError

        raise StageError(
            f"{folder}: the weights do not fit the head-pruned config "
            f"(missing {sorted(absent)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model.to(dtype) if dtype is not None else model
