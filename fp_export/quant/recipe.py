"""Quantization recipes: YAML files validated once, at load, into frozen pydantic models.

An unknown key anywhere is an error naming it; so is a value outside its choices.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GPTQConfig(_Strict):
    """GPTQ (arXiv 2210.17323): damping as a fraction of the mean Hessian diagonal, lazy-update
    block width in columns, act-order (columns by decreasing Hessian diagonal; group scales are
    then fixed up front from the unquantized weight, "static groups")."""

    damp: float = Field(0.01, gt=0, lt=1)
    block_size: int = Field(128, ge=1)
    act_order: bool = False


class WeightConfig(_Strict):
    format: Literal["fp8_e4m3", "fp4_e2m1", "int8", "int4"]
    group_size: int | None = Field(256, ge=2)
    scale_constraint: Literal["none", "m1", "m2"] = "none"
    method: Literal["rtn", "gptq"] = "gptq"
    gptq: GPTQConfig = GPTQConfig()

    @model_validator(mode="after")
    def _constraint_needs_fp4(self) -> "WeightConfig":
        if self.scale_constraint != "none" and self.format != "fp4_e2m1":
            raise ValueError(f"scale_constraint {self.scale_constraint} needs format fp4_e2m1")
        if self.group_size is not None and self.group_size % 2:
            raise ValueError(f"group_size must be even, got {self.group_size}")
        return self


class LoRCConfig(_Strict):
    """Low-rank compensation (ZeroQuant-V2): rank of the truncated SVD of W - Q, and the grid its
    two factors are stored on (per-row symmetric scales), or none for float32 factors."""

    rank: int = Field(8, ge=1)
    factor_format: Literal["none", "int8", "fp8_e4m3"] = "int8"


class ActivationConfig(_Strict):
    format: Literal["fp8_e4m3", "int8"]
    granularity: Literal["token", "tensor"] = "token"


class CalibrationConfig(_Strict):
    """Calibration windows: ``source`` is a split of the packaged corpus or a text file path;
    ``seqlen`` is capped at the model's max_position_embeddings."""

    source: str = "train"
    nsamples: int = Field(128, ge=1)
    seqlen: int = Field(2048, ge=8)
    seed: int = 0


class Recipe(_Strict):
    name: str
    description: str = ""
    weights: WeightConfig | None = None
    activations: ActivationConfig | None = None
    lorc: LoRCConfig | None = None
    calibration: CalibrationConfig = CalibrationConfig()

    @model_validator(mode="after")
    def _lorc_needs_weights(self) -> "Recipe":
        if self.lorc is not None and self.weights is None:
            raise ValueError("lorc needs quantized weights")
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON of the recipe: names it in manifests and resume state."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message names the file and the key."""


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe. ``path`` is a YAML file or the name of a bundled recipe."""
    p = Path(path)
    if not p.exists() and (RECIPES_DIR / f"{path}.yaml").exists():
        p = RECIPES_DIR / f"{path}.yaml"
    if not p.is_file():
        raise RecipeError(f"recipe {path}: no such file (bundled: {', '.join(bundled_recipes())})")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {p}: not valid YAML: {e}") from None
    return recipe_from_dict(data, str(p))


def recipe_from_dict(data: object, origin: str) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {origin}: expected a mapping at top level")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '<top>'}: "
            + ("unknown key" if err["type"] == "extra_forbidden" else err["msg"])
            for err in e.errors()
        )
        raise RecipeError(f"recipe {origin}: {problems}") from None


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
