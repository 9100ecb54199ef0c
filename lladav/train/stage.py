"""A stage as data: which components train, at which learning rate, from which weights.

Owns: turning a StageConfig into the model's frozen/trainable split and the optimizer's
parameter groups (one per trained component, with its own learning rate), the table of that
split that every run logs, and building the stage's initial model. Does not own: DeepSpeed
(train/engine.py) or the loop (train/loop.py).
"""

from __future__ import annotations

from typing import Any

from lladav.config import StageConfig


def apply_stage(model: Any, stage: StageConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Freeze what the stage does not train; return (param_groups, table rows).

    param_groups: [{"name", "params", "lr"}] for trained components only. Rows: one per
    component with `trainable`, `lr`, `parameters` (count), for the log and lineage.
    """
    groups, rows = [], []
    rates = stage.trainable.model_dump()
    for component, named in model.component_parameters().items():
        lr = rates[component]
        for _, p in named:
            p.requires_grad_(lr is not None)
        count = sum(int(getattr(p, "ds_numel", p.numel())) for _, p in named)
        rows.append({"component": component, "trainable": lr is not None, "lr": lr, "parameters": count})
        if lr is not None:
            groups.append({"name": component, "params": [p for _, p in named], "lr": lr})
    return groups, rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'component':<16}{'state':<11}{'lr':>10}{'parameters':>14}"]
    for r in rows:
        lr = f"{r['lr']:.1e}" if r["lr"] is not None else "-"
        lines.append(f"{r['component']:<16}{'trainable' if r['trainable'] else 'frozen':<11}"
                     f"{lr:>10}{r['parameters']:>14,}")
    return "\n".join(lines)


def initial_weights(stage: StageConfig, tokenizer: Any) -> tuple[Any, dict | None]:
    """The stage's model config and the weights to load into it (None: random init of a flavour).

    The model itself is built by the caller, under ZeRO-3's zero.Init, from the config.
    """
    from lladav.model.flavors import lladav_config_for
    from lladav.model.lladav import LLaDAVModel

    init = stage.init
    if init.flavor:
        config = lladav_config_for(init.flavor, tokenizer)
        weights = None
    elif init.export:
        from lladav import storage

        with storage.local_folder(init.export) as folder:
            source = LLaDAVModel.from_pretrained(folder, local_files_only=True)
        config, weights = source.config, source.state_dict()
    else:
        source = LLaDAVModel.from_components(init.language_model, init.vision_tower)
        config, weights = source.config, source.state_dict()
    if stage.image_aspect:
        config.image_aspect = stage.image_aspect
    if stage.max_grid is not None:
        config.max_grid = stage.max_grid
    if stage.max_tiles_area is not None:
        config.max_tiles_area = stage.max_tiles_area
    return config, weights
