"""What a method needs from the front ends: how a generation runs it and which settings a user gives apart
from the settings JSON. Declared on the method class (`needs = Needs(...)`); the generation runner, the
CLI, the workflow runner and the app read it, so none of them lists method names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# How a generation runs a method (the runners live in attnpack.pipelines.generate):
#   "apply"          the pipeline's own call with the method applied
#   "long_video"     attnpack.pipelines.long_video (more frames than the model was trained on)
#   "multi_subject"  attnpack.pipelines.multi_subject (references first, then the scene)
#   "trajectory"     attnpack.pipelines.trajectory_video (boxes over frames)
RUNNERS = ("apply", "long_video", "multi_subject", "trajectory")

# The kinds of input a front end offers its own widget for, and the value each gives the method.
INPUT_KINDS = {
    "subjects": "a list of {name, prompt, box: [x0, y0, x1, y1] in [0, 1]}",
    "keyframes": "keyframe boxes [[frame, y1, y2, x1, x2], ...] in [0, 1]",
    "text": "a string",
}


@dataclass(frozen=True)
class Input:
    """One setting a user gives in a widget of its own (a table, a text box) rather than in the settings JSON.
    `name` is the method's field; `alternatives` name fields that can stand in for it (a point track for the
    keyframes)."""

    name: str
    kind: str
    label: str
    required: bool = False
    alternatives: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in INPUT_KINDS:
            raise ValueError(
                f"Input {self.name!r}: kind={self.kind!r} is not one of {', '.join(INPUT_KINDS)}"
            )

    def given(self, settings: dict[str, Any]) -> bool:
        return any(settings.get(name) not in (None, "", [], ()) for name in (self.name, *self.alternatives))

    def describe(self) -> str:
        names = " or ".join((self.name, *self.alternatives))
        return f"{names} ({INPUT_KINDS[self.kind]})"


@dataclass(frozen=True)
class Needs:
    """`runner`: one of RUNNERS. `tab`: the app tab the method has to itself (None: the Image or Video tab of
    the preset's kind, beside the other methods that run through "apply"). `inputs`: the settings given in
    widgets of their own."""

    runner: str = "apply"
    tab: str | None = None
    inputs: tuple[Input, ...] = ()

    def __post_init__(self):
        if self.runner not in RUNNERS:
            raise ValueError(f"Needs: runner={self.runner!r} is not one of {', '.join(RUNNERS)}")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(name for given in self.inputs for name in (given.name, *given.alternatives))

    def check(self, method: str, settings: dict[str, Any]) -> None:
        """Raise ValueError naming what a run of `method` with `settings` still lacks."""
        missing = [given.describe() for given in self.inputs if given.required and not given.given(settings)]
        if missing:
            raise ValueError(f"method {method!r} needs {'; '.join(missing)}")


__all__ = ["INPUT_KINDS", "RUNNERS", "Input", "Needs"]
