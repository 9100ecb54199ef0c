"""A stage as data: which components train, at which learning rate, from which weights.

Owns: turning a StageConfig into the model's frozen/trainable split and the optimizer's
parameter groups (one per trained component, with its own learning rate), the table of that
split that every run logs, and building the stage's initial model. Does not own: DeepSpeed
(train/engine.py) or the loop (train/loop.py).
"""

from __future__ import annotations

import json
from typing import Any

from lladav.config import ConfigError, StageConfig, StageInit, VisionGeometry


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


def tower_geometry(init: StageInit) -> tuple[int, int, str] | None:
    """(tile size, patch size, where that was read) of the vision tower a stage starts from,
    without loading weights: from the flavour table, or the config.json of the tower or export
    folder. None when the folder is not there yet (a step that has not run) or unreadable."""
    from lladav import storage
    from lladav.model.flavors import FLAVORS

    if init.flavor:
        tower = FLAVORS.get(init.flavor, {}).get("vision_tower")
        if tower is None:
            return None
        return tower["image_size"], tower["patch_size"], f"flavor {init.flavor}"
    folder = init.vision_tower or init.export
    try:
        config = json.loads(storage.read_bytes(storage.join(str(folder), "config.json")))
    except (FileNotFoundError, storage.StorageError, ValueError):
        return None
    vision = config.get("vision_config", config)
    if "image_size" not in vision or "patch_size" not in vision:
        return None
    return vision["image_size"], vision["patch_size"], f"{folder}/config.json"


def check_geometry(stage_name: str, tower: tuple[int, int, str] | None, mixture: VisionGeometry,
                   mixture_where: str) -> None:
    """Refuse a mixture whose image tokens were counted for another tower: ConfigError naming
    both values and the fix. The grid and aspect are the mixture's alone (the model takes them)."""
    if tower is None:
        return
    tile, patch, where = tower
    if (tile, patch) != (mixture.tile_size, mixture.patch_size):
        raise ConfigError(
            f"stage {stage_name}: its mixture ({mixture_where}) was built for {mixture.tile_size} "
            f"px tiles of {mixture.patch_size} px patches, but its model's vision tower ({where}) "
            f"takes {tile} px tiles of {patch} px patches. Set `vision: {{tile_size: {tile}, "
            f"patch_size: {patch}}}` in the recipe and rebuild, or start from a matching model")


def initial_weights(stage: StageConfig, tokenizer: Any,
                    geometry: VisionGeometry) -> tuple[Any, dict | None]:
    """The stage's model config and the weights to load into it (None: random init of a flavour).

    `geometry` is the mixture's (its one owner): the model takes its aspect and grid from it,
    and a tower of another tile or patch size is refused (check_geometry). The model itself is
    built by the caller, under ZeRO-3's zero.Init, from the config.
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
    vision = config.vision_config
    check_geometry(stage.name, (vision.image_size, vision.patch_size, "the init model"), geometry,
                   stage.mixture)
    config.image_aspect = geometry.image_aspect
    config.max_grid, config.max_tiles_area = geometry.max_grid, geometry.max_tiles_area
    return config, weights
