"""Progressive resizing: a run as a list of phases, each training at its own
image size and batch size until an epoch of the run ("Fast is better than
free" trains ImageNet at 128 px crops of images resized to 160, then 224,
then 288 px).

A phase is written ``UNTIL:SIZE[:BATCH[:SOURCE]]`` (a flag or YAML string) or
as a mapping ``{until, image_size, batch_size, source_size}``: it ends when
the run reaches ``until`` epochs (the unit of ``--epochs``: natural-training
epochs, so free-m's phase ends after ceil(until / m) passes), trains at
``image_size`` with a global batch of ``batch_size`` (default: the run's) and
the LR scaled by batch_size / the run's batch size, from images whose shorter
side is first resized to ``source_size`` (default: full size).

Free-m's persistent perturbation restarts from zero when a phase starts
(``FreeAdversarialTrainer.start_phase``) rather than being
resized: delta belongs to batch slots, not to images, so an interpolated one
carries no image's adversarial direction, only a blurred mean of past ones;
with free-m's step of epsilon, a single replay puts the new delta back at the
budget. The Fast-AT code that defined these phases starts every phase as a
new process with a zero buffer too.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


class PhaseError(ValueError):
    """A phase list that cannot run; the message names the phase."""


@dataclass(frozen=True)
class Phase:
    until: float  # the run's epoch (natural-training epochs) at which the phase ends
    image_size: int
    batch_size: int  # global
    source_size: int | None = None  # resize the shorter side to this before the random-resized crop

    def text(self) -> str:
        return ":".join(str(v) for v in (f"{self.until:g}", self.image_size, self.batch_size, self.source_size)
                        if v is not None)


def _int(value, what: str, index: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PhaseError(f"phase {index + 1}: {what} must be an integer >= {low}, got {value!r}")
    return value


def parse(items, *, epochs: float, batch_size: int) -> list[Phase]:
    """The phases of a run from strings or mappings, checked: ``until``
    increasing and the last one the run's ``epochs``."""
    if not isinstance(items, list):
        raise PhaseError(f"phases must be a list, got {items!r}")
    phases = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            parts = item.split(":")
            if not 2 <= len(parts) <= 4:
                raise PhaseError(f"phase {i + 1}: {item!r} is not UNTIL:SIZE[:BATCH[:SOURCE]]")
            try:
                values = [float(parts[0])] + [int(p) if p else None for p in parts[1:]]
            except ValueError:
                raise PhaseError(f"phase {i + 1}: {item!r} is not UNTIL:SIZE[:BATCH[:SOURCE]] (numbers)") from None
            item = dict(zip(("until", "image_size", "batch_size", "source_size"), values))
        if not isinstance(item, dict):
            raise PhaseError(f"phase {i + 1}: {item!r} is neither UNTIL:SIZE[:BATCH[:SOURCE]] nor a mapping")
        unknown = sorted(set(item) - {"until", "image_size", "batch_size", "source_size"})
        if unknown:
            raise PhaseError(f"phase {i + 1}: unknown key(s) {', '.join(map(str, unknown))}")
        until = item.get("until")
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not until > 0 or not math.isfinite(until):
            raise PhaseError(f"phase {i + 1}: until must be a positive number of epochs, got {until!r}")
        size = _int(item.get("image_size"), "image_size", i, 8)
        batch = _int(batch_size if item.get("batch_size") is None else item["batch_size"], "batch_size", i, 1)
        source = item.get("source_size")
        if source is not None and _int(source, "source_size", i, 1) < size:
            raise PhaseError(f"phase {i + 1}: source_size {source} is smaller than its image_size {size}")
        if phases and until <= phases[-1].until:
            raise PhaseError(f"phase {i + 1}: until {until:g} does not come after phase {i}'s {phases[-1].until:g}")
        phases.append(Phase(float(until), size, batch, source))
    if phases and phases[-1].until != epochs:
        raise PhaseError(f"the last phase ends at epoch {phases[-1].until:g}, but the run has {epochs:g} epochs")
    return phases


def pass_ends(phases: list[Phase], replays: int) -> list[int]:
    """The pass count at which each phase ends: ceil(until / replays), as the
    run's passes are (scheduler.passes_for); every phase must get a pass."""
    ends = [math.ceil(p.until / replays) for p in phases]
    for i in range(1, len(ends)):
        if ends[i] <= ends[i - 1]:
            raise PhaseError(f"phase {i + 1} (until {phases[i].until:g}) gets no pass of its own with {replays} "
                             f"replays: phases end at passes {ends}; space the phases further apart")
    return ends


def phase_of(ends: list[int], passes_done: int) -> int:
    """The index of the phase a run with ``passes_done`` complete passes is in."""
    return min(bisect.bisect_right(ends, passes_done), len(ends) - 1)

