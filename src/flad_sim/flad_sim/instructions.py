"""Navigation command ids and LMDrive-style instruction / notice texts (and a parser back to ids).

Command ids are CARLA's `RoadOption` values minus one (LEFT=1 ... CHANGELANERIGHT=6 in CARLA), the
convention TransFuser/LMDrive use for their one-hot command input. Texts are generated from templates;
`parse_instruction` inverts them so a label can be checked or a human instruction mapped to an id.
"""

from __future__ import annotations

import re

CMD_LEFT = 0
CMD_RIGHT = 1
CMD_STRAIGHT = 2
CMD_FOLLOW = 3
CMD_CHANGE_LEFT = 4
CMD_CHANGE_RIGHT = 5
COMMAND_NAMES = ("left", "right", "straight", "follow_lane", "change_lane_left", "change_lane_right")
N_COMMANDS = len(COMMAND_NAMES)

#: templates per command: the first list has a distance slot {d}, the second is for "now" / no distance
TEMPLATES: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {
    CMD_LEFT: (("turn left at the next intersection in {d} m", "make a left turn at the intersection {d} m ahead",
                "in {d} m, turn left at the intersection"),
               ("turn left at this intersection", "turn left now")),
    CMD_RIGHT: (("turn right at the next intersection in {d} m", "make a right turn at the intersection {d} m ahead",
                 "in {d} m, turn right at the intersection"),
                ("turn right at this intersection", "turn right now")),
    CMD_STRAIGHT: (("go straight at the next intersection in {d} m",
                    "keep going straight through the intersection {d} m ahead",
                    "in {d} m, drive straight across the intersection"),
                   ("go straight through this intersection", "keep straight now")),
    CMD_FOLLOW: (("follow the lane for {d} m", "keep driving along this road for {d} m",
                  "stay in your lane for the next {d} m"),
                 ("follow the lane", "keep driving along this road")),
    CMD_CHANGE_LEFT: (("change to the left lane in {d} m", "move into the left lane within {d} m",
                       "in {d} m, switch to the left lane"),
                      ("change to the left lane", "move into the left lane now")),
    CMD_CHANGE_RIGHT: (("change to the right lane in {d} m", "move into the right lane within {d} m",
                        "in {d} m, switch to the right lane"),
                       ("change to the right lane", "move into the right lane now")),
}

NOTICE_NONE = 0
NOTICE_RED_LIGHT = 1
NOTICE_YELLOW_LIGHT = 2
NOTICE_STOP_SIGN = 3
NOTICE_PEDESTRIAN = 4
NOTICE_VEHICLE_STOPPED = 5
NOTICE_TEXTS = ("", "red light ahead", "yellow light ahead", "stop sign ahead", "pedestrian crossing ahead",
                "stopped vehicle ahead")


def instruction_text(command: int, distance_m: float | None = None, variant: int = 0) -> str:
    """Instruction for a command; `distance_m` (rounded to whole metres) selects a template with a distance."""
    if command not in TEMPLATES:
        raise ValueError(f"unknown command id {command}")
    with_d, without_d = TEMPLATES[command]
    if distance_m is None:
        return without_d[variant % len(without_d)]
    return with_d[variant % len(with_d)].format(d=round(distance_m))


def _compile() -> list[tuple[re.Pattern[str], int, bool]]:
    out = []
    for cmd, (with_d, without_d) in TEMPLATES.items():
        for t in with_d:
            out.append((re.compile("^" + re.escape(t).replace(r"\{d\}", r"(\d+)") + "$"), cmd, True))
        for t in without_d:
            out.append((re.compile("^" + re.escape(t) + "$"), cmd, False))
    return out


_PATTERNS = _compile()


def parse_instruction(text: str) -> tuple[int, int | None]:
    """(command id, distance in m or None) of an instruction produced by `instruction_text`."""
    t = " ".join(text.strip().lower().split())
    for pat, cmd, has_d in _PATTERNS:
        m = pat.match(t)
        if m:
            return cmd, int(m.group(1)) if has_d else None
    raise ValueError(f"not a known instruction: {text!r}")


def notice_text(notice: int) -> str:
    return NOTICE_TEXTS[notice]


def parse_notice(text: str) -> int:
    t = " ".join(text.strip().lower().split())
    if t not in NOTICE_TEXTS:
        raise ValueError(f"not a known notice: {text!r}")
    return NOTICE_TEXTS.index(t)
